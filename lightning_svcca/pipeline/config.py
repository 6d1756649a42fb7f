"""The monitor's options, checked once where the user passes them (so a bad value fails at construction).

:class:`MonitorConfig` holds the arguments shared by :class:`~lightning_svcca.pipeline.monitor.SVCCAMonitor`,
``SVCCACallback`` and the HuggingFace callback, checks each against its allowed values, and derives what follows
from them: the parsed references (with a freeze policy's lag reference added) and the decomposition dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_svcca.freezing.freezer import FreezePolicy
from lightning_svcca.measures._checks import check_keep
from lightning_svcca.pipeline.activations import REDUCTIONS
from lightning_svcca.pipeline.metrics import METRICS
from lightning_svcca.pipeline.moments import CROSS_LAYER_MOMENTS
from lightning_svcca.pipeline.references import Reference, parse_references

__all__ = ["COMPUTE_DTYPES", "MonitorConfig"]

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "auto": None}


@dataclass
class MonitorConfig:
    """Every option of the monitor (see :class:`~lightning_svcca.SVCCACallback` for their meaning)."""

    probe: Any = None
    layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None
    reference: Any = ("previous", "final")
    metrics: str | Sequence[str] = ("svcca",)
    every_n_epochs: int | None = 1
    freeze: FreezePolicy | None = None
    every_n_train_steps: int | None = None
    probe_size: int = 1024
    probe_batch_size: int = 256
    probe_input: int | str | None = None
    probe_mask: int | str | bool | None = None
    probe_seed: int = 0
    forward_fn: Any = None
    reduction: str = "positions"
    max_datapoints: int = 4096
    keep: float | int = 0.99
    keep_by: str = "singular_values"
    baseline: bool = True
    max_snapshot_bytes: int | None = 1 << 30
    shard_probe: bool = True
    compute_dtype: str = "auto"
    cross_layer: bool | Sequence[float] = False
    cross_layer_reference: str = "final"
    heatmap_time_share: float = 0.05
    #: Parsed references, with a convergence policy's lag reference appended when it is not "previous".
    references: list[Reference] = field(init=False)
    #: The reference a convergence policy judges by: a layer's snapshot ``lag`` epochs earlier.
    lag_reference: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        metrics = self.metrics
        unknown = [metric for metric in metrics if metric not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {list(metrics)}")
        if not 0.0 < self.heatmap_time_share <= 1.0:
            raise ValueError(
                f"heatmap_time_share must be in (0, 1] (1.0 draws every heatmap), got {self.heatmap_time_share!r}"
            )
        for name in ("every_n_epochs", "every_n_train_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        if self.every_n_epochs is None and self.every_n_train_steps is None:
            raise ValueError("every_n_epochs and every_n_train_steps are both None: set one of them to measure")
        by_step = self.every_n_train_steps is not None
        cadence = 1 if by_step else self.every_n_epochs
        freeze = self.freeze
        if freeze is not None and not isinstance(freeze, FreezePolicy):
            raise TypeError(f"freeze must be a FreezePolicy or None, got {type(freeze).__name__}")
        if freeze is not None and freeze.mode == "convergence" and not by_step and freeze.lag % cadence:
            raise ValueError(
                f"FreezePolicy.lag={freeze.lag} must be a multiple of every_n_epochs={self.every_n_epochs}:"
                " convergence compares a layer with its snapshot lag epochs earlier, so that epoch must be measured"
            )
        if freeze is not None and freeze.mode == "convergence" and freeze.metric not in metrics:
            raise ValueError(
                f"FreezePolicy(metric={freeze.metric!r}) judges convergence by a metric the monitor does not"
                f" measure; add it: metrics={(*metrics, freeze.metric)}"
            )
        if freeze is not None and freeze.noise_aware and not self.baseline:
            raise ValueError("FreezePolicy(noise_aware=True) needs the shuffled baseline: keep baseline=True")
        for name in ("probe_size", "probe_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_datapoints < 2:
            raise ValueError(f"max_datapoints must be >= 2, got {self.max_datapoints}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(f"forward_fn must be callable as forward_fn(model, batch), got {self.forward_fn!r}")
        check_keep(self.keep, self.keep_by)
        self.references = parse_references(self.reference)
        moments = self.cross_layer_moments
        if any(not isinstance(f, float) or not 0.0 <= f <= 1.0 for f in moments):
            raise ValueError(f"cross_layer must be True or fractions of training in [0, 1], got {self.cross_layer!r}")
        fixed = [ref.name for ref in self.references if ref.kind in ("module", "checkpoint")]
        if moments and self.cross_layer_reference not in ("final", "initial", *fixed):
            raise ValueError(
                f"cross_layer_reference must be 'final', 'initial' or a fixed model reference {fixed}, got"
                f" {self.cross_layer_reference!r}"
            )
        if freeze is not None and freeze.mode == "convergence":
            # per epoch, lag counts epochs; every k steps, it counts measurements
            self.lag_reference = "previous" if freeze.lag == cadence else f"lag{freeze.lag}"
            if self.lag_reference not in self.reference_names:
                self.references.append(Reference(self.lag_reference, "lag", lag=freeze.lag))

    @property
    def cross_layer_moments(self) -> tuple[float, ...]:
        """The fractions of training kept for cross-layer maps (empty: no maps)."""
        if self.cross_layer is True:
            return CROSS_LAYER_MOMENTS
        if not self.cross_layer:
            return ()
        return tuple(float(fraction) for fraction in self.cross_layer)

    @property
    def reference_names(self) -> list[str]:
        """Names of the references, as they appear in the history and the tags."""
        return [reference.name for reference in self.references]

    @property
    def dtype(self) -> torch.dtype | None:
        """The chosen decomposition dtype, ``None`` for ``"auto"``."""
        return COMPUTE_DTYPES[self.compute_dtype]
