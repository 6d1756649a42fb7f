"""The monitor's options, declared, documented and checked once (so a bad value fails at construction).

:class:`MonitorConfig` is the one place where each option of :class:`~lightning_svcca.monitoring.monitor.SVCCAMonitor`,
``SVCCACallback`` and the HuggingFace callback has its type, its default and its documentation (the ``Args:`` of
its docstring); the adapters take them as keyword arguments through
:func:`~lightning_svcca.monitoring.options.takes_monitor_options`. It checks each option against its allowed
values, and derives what follows from them: the parsed references (with a freeze policy's lag reference added)
and the decomposition dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, TypeAlias, TypedDict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca.freezing.policy import FreezePolicy
from lightning_svcca.measures._checks import check_keep
from lightning_svcca.pipeline.metrics import METRICS
from lightning_svcca.pipeline.moments import CROSS_LAYER_MOMENTS
from lightning_svcca.pipeline.probe import ForwardFn
from lightning_svcca.pipeline.reduction import REDUCTIONS
from lightning_svcca.pipeline.references import Reference, ReferenceKind, parse_references

#: Samples the probe takes from a DataLoader by default (all of them when it holds fewer).
DEFAULT_PROBE_SIZE = 1024

__all__ = [
    "COMPUTE_DTYPES",
    "LayersArg",
    "MetricsArg",
    "MonitorConfig",
    "MonitorOptions",
    "ProbeArg",
    "ReferenceArg",
]

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "auto": None}

# The types of the options that can also be given by position (the public classes write them out in their own
# signatures; the rest come through ``**options: Unpack[MonitorOptions]``).
ProbeArg: TypeAlias = DataLoader | Tensor | Sequence[Any] | Mapping[str, Any] | None
LayersArg: TypeAlias = Sequence[str] | Mapping[str, Mapping[str, Any]] | None
ReferenceArg: TypeAlias = str | nn.Module | Tensor | Sequence[Any] | Mapping[str, Any]
MetricsArg: TypeAlias = str | Sequence[str]


@dataclass
class MonitorConfig:
    """Every option of the monitor, checked: the one place each is declared and documented.

    The adapters (``SVCCACallback``, ``SVCCATrainerCallback``) take these options as keyword arguments of their own:
    their signatures and ``Args:`` docs are generated from this class by
    :func:`~lightning_svcca.monitoring.options.takes_monitor_options`. The first six can also be given by
    position.

    Args:
        probe: the probe: a tensor (the model input), a batch (tuple, list or dict of tensors), or a
            DataLoader (``probe_size`` samples drawn at random with ``probe_seed``, so class-sorted datasets are
            covered). ``None`` (Lightning callback): such a subset of the validation dataloader, else of the
            training one. Fixed for the whole run, the same on every process and after resuming. In a
            LightningCLI config: left out (with ``probe_size``), or a DataLoader class given by ``class_path``.
        layers: module names from ``model.named_modules()``, or ``{name: {"output": ..., "reduction": ...,
            "layout": ...}}`` for per-layer options (see :class:`~lightning_svcca.pipeline.layers.LayerSpec`).
            ``None``: the repeated blocks a person would name (``encoder.layer.N``, ``layerK.M``) plus stems and
            heads; in models without repeated blocks, every Linear, Conv, RNN and Transformer layer. The chosen
            layers are logged once at the start.
        reference: what each layer is compared with, one or several of: ``"previous"`` (the last measured
            epoch), ``"initial"`` (before training), ``"final"`` (at the end of fit, every epoch against the last
            one: the SVCCA paper's learning-dynamics plot), an ``nn.Module`` or a checkpoint path (a fixed model,
            e.g. the pretrained one being fine-tuned; layers matched by name), or a tensor of features aligned
            with the probe's samples (e.g. inputs or one-hot labels). Name fixed references with a dict
            ``{"pretrained": model}``; an unnamed one is called ``"reference"``.
        metrics: one or several of the 15 measures: ``"svcca"``, ``"pwcca"``, ``"cca"`` (mean canonical
            correlation), ``"r2cca"`` (mean squared canonical correlation), ``"linear_cka"``,
            ``"linear_cka_debiased"``, ``"procrustes"`` (one minus the normalised Procrustes distance),
            ``"rbf_cka"``, the held-out ``"cca_heldout"``, ``"svcca_heldout"``, ``"pwcca_heldout"`` (canonical
            directions fitted on part of the probe, correlations read on the rest), and the sample-level
            ``"mutual_knn"``, ``"cknna"`` (10 cosine neighbours), ``"minibatch_cka"`` (unbiased HSIC over chunks of
            256 probe rows) and ``"rsa"`` (Spearman correlation of correlation-distance RDMs). Every metric but
            ``"svcca"`` stores full-rank snapshots. With ``baseline``, each value is also logged calibrated against
            its shuffled baseline as ``{metric}_calibrated`` (see docs/measures.md).
        every_n_epochs: measure every this many epochs (epoch 0 and the end of fit are always measured); ``None``
            with ``every_n_train_steps`` measures by steps only.
        freeze: a :class:`~lightning_svcca.freezing.policy.FreezePolicy` to freeze converged layers, or ``None``.
        every_n_train_steps: also measure every this many optimizer steps (as ``ModelCheckpoint`` names it), for
            short fine-tunes and step-based runs. Measurements are then identified by their global step: the
            history's ``step`` column, the heatmaps' columns, and a freeze policy's ``lag`` counts measurements.
        probe_size: samples taken from a DataLoader (and the cap for a tensor or batch probe); a DataLoader with
            fewer gives them all (a warning says so when you set ``probe_size``, not under the default).
        probe_batch_size: samples per forward pass of the probe.
        probe_input: the part of a batch that is the model input (index or key; default: element 0 of a tuple).
        probe_mask: the part of a batch holding a sequence padding mask ``(N, T)`` (1 = real frame) or lengths
            ``(N,)``; a dict batch's ``attention_mask`` by default (``False``: none).
        probe_seed: seeds the choice of a DataLoader probe's samples.
        forward_fn: ``forward_fn(model, batch)`` for models whose ``forward`` does not take the probe input
            directly; a dict batch is passed as ``model(**batch)`` by default.
        reduction: default reduction of outputs with positions: ``"positions"`` (each conv position or
            sequence frame is a datapoint), ``"mean"`` or ``"flatten"``.
        max_datapoints: cap on datapoints per layer: each probe sample contributes at most
            ``max_datapoints // probe_size`` positions or frames (at least one).
        keep: SVCCA's ``keep`` (fraction of the singular value sum, or a number of directions).
        keep_by: ``"singular_values"`` (the paper's) or ``"variance"``.
        baseline: also log each metric on the probe with its datapoint pairing shuffled (the noise floor), and
            each compared value calibrated against it, ``(s - b) / (1 - b)``, as metric ``{metric}_calibrated``.
        max_snapshot_bytes: memory budget for snapshots held in memory; ``None``: unbounded. With a log
            directory (the Lightning callback's: the TensorBoard or CSV logger's ``log_dir``, else
            ``default_root_dir``; the HuggingFace one's ``output_dir``) every
            snapshot is also written to ``<log_dir>/svcca_snapshots/<run_id>/`` when taken, and those files stay
            after the fit (checkpoints refer to them); snapshots beyond the budget are read back from there.
            Without one, snapshots beyond the budget spill to a temporary folder that ``close()`` deletes (the
            callbacks close the monitor when the fit ends or fails).
        shard_probe: under DDP, each process runs its share of the probe and statistics are summed.
        compute_dtype: precision of the decompositions: ``"float64"``, ``"float32"``, or ``"auto"`` (default):
            float32 on a GPU when the only metric is linear_cka (accurate there, and much faster on GPUs with slow
            float64), float64 otherwise. float32 decompositions resolve directions only down to about 1% of the
            largest, which can shift SVCCA on layers whose spectrum spans several decades.
        cross_layer: keep every layer at 0, 25, 50, 75 and 100% of training (``True``) or at the given fractions,
            and at the end of fit map each moment, every layer against every layer of ``cross_layer_reference``
            (the SVCCA paper's Fig. 4): images ``{metric}/cross_layer/{reference}`` at each moment's step, and
            ``svcca_cross_layer.csv`` beside the history. Layers are pooled to one datapoint per probe sample.
        cross_layer_reference: ``"final"`` (default), ``"initial"``, or the name of a fixed model reference.
        heatmap_time_share: the largest share of the fit's time that drawing heatmap images may take (default
            5%). A heatmap that would exceed it is drawn at a later measurement instead, and every heatmap's
            latest state is drawn at the end of the fit; scalars and the history are never thinned. ``1.0``
            draws every heatmap at every measurement.
    """

    probe: ProbeArg = None
    layers: LayersArg = None
    reference: ReferenceArg = ("previous", "final")
    metrics: MetricsArg = ("svcca",)
    every_n_epochs: int | None = 1
    freeze: FreezePolicy | None = None
    _: KW_ONLY
    every_n_train_steps: int | None = None
    probe_size: int = DEFAULT_PROBE_SIZE
    probe_batch_size: int = 256
    probe_input: int | str | None = None
    probe_mask: int | str | bool | None = None
    probe_seed: int = 0
    forward_fn: ForwardFn | None = None
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
    #: The reference the freeze rule judges by (its ``lagged`` snapshot): ``lag`` epochs earlier (``Convergence``)
    #: or a fraction of the measurements earlier, named ``lag{fraction}t``, with ``"initial"`` (``Movement``).
    lag_reference: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        self._check_metrics_and_cadence()
        by_step = self.every_n_train_steps is not None
        cadence = 1 if by_step or self.every_n_epochs is None else self.every_n_epochs
        self._check_freeze(cadence, by_step)
        self._check_values()
        self.references = parse_references(self.reference)
        self._check_cross_layer()
        self._add_freeze_references(cadence)

    def _check_metrics_and_cadence(self) -> None:
        """The metrics, the heatmap time share, and measuring every so many epochs or steps (one of them at least)."""
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

    def _check_values(self) -> None:
        """The probe's sizes, the datapoint cap, the reduction, the dtype, ``forward_fn`` and SVCCA's ``keep``."""
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

    def _check_cross_layer(self) -> None:
        """The cross-layer moments (fractions of training) and the reference their maps compare with."""
        moments = self.cross_layer_moments
        if any(not isinstance(f, float) or not 0.0 <= f <= 1.0 for f in moments):
            raise ValueError(f"cross_layer must be True or fractions of training in [0, 1], got {self.cross_layer!r}")
        fixed = [ref.name for ref in self.references if ref.kind.needs_model_pass]
        if moments and self.cross_layer_reference not in ("final", "initial", *fixed):
            raise ValueError(
                f"cross_layer_reference must be 'final', 'initial' or a fixed model reference {fixed}, got"
                f" {self.cross_layer_reference!r}"
            )

    def _check_freeze(self, cadence: int, by_step: bool) -> None:
        """The freeze policy against the cadence, the metrics and the baseline."""
        freeze, metrics = self.freeze, self.metrics
        if freeze is not None and not isinstance(freeze, FreezePolicy):
            raise TypeError(f"freeze must be a FreezePolicy or None, got {type(freeze).__name__}")
        if freeze is None:
            return
        lagged = freeze.rule.lagged
        if lagged is not None and lagged.lag and not by_step and lagged.lag % cadence:
            raise ValueError(
                f"{freeze.rule!r}: lag={lagged.lag} must be a multiple of every_n_epochs={self.every_n_epochs}:"
                " the rule compares a layer with its snapshot lag epochs earlier, so that epoch must be measured"
            )
        if freeze.rule.reads_task and freeze.metric not in metrics:
            raise ValueError(
                f"FreezePolicy(metric={freeze.metric!r}) judges convergence by a metric the monitor does not"
                f" measure; add it: metrics={(*metrics, freeze.metric)}"
            )
        if freeze.rule.needs_baseline and not self.baseline:
            raise ValueError(f"{freeze.rule!r} reads the shuffled baseline (noise_aware=True): keep baseline=True")

    def _add_freeze_references(self, cadence: int) -> None:
        """The references a freeze rule reads: a fixed lag (convergence), a growing lag and the first (movement)."""
        lagged = None if self.freeze is None else self.freeze.rule.lagged
        if lagged is None:
            return
        if lagged.fraction:  # a lag that grows with the run
            self.lag_reference = f"lag{lagged.fraction:g}t"
            self.references.append(Reference(self.lag_reference, ReferenceKind.LAG, fraction=lagged.fraction))
        else:  # per epoch, lag counts epochs; every k steps, it counts measurements
            self.lag_reference = "previous" if lagged.lag == cadence else f"lag{lagged.lag}"
            if self.lag_reference not in self.reference_names:
                self.references.append(Reference(self.lag_reference, ReferenceKind.LAG, lag=lagged.lag))
        if lagged.initial and "initial" not in self.reference_names:
            self.references.append(Reference("initial", ReferenceKind.INITIAL))

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


class MonitorOptions(TypedDict, total=False):
    """The keyword-only options of :class:`MonitorConfig`, for ``**options: Unpack[MonitorOptions]``.

    What a type checker reads in the signatures of ``SVCCAMonitor``, ``SVCCACallback`` and ``SVCCATrainerCallback``
    (a misspelled or mistyped option is an error there); each option's meaning and default are MonitorConfig's.
    ``tests/test_options.py`` keeps these keys and types equal to MonitorConfig's keyword-only fields.
    """

    every_n_train_steps: int | None
    probe_size: int
    probe_batch_size: int
    probe_input: int | str | None
    probe_mask: int | str | bool | None
    probe_seed: int
    forward_fn: ForwardFn | None
    reduction: str
    max_datapoints: int
    keep: float | int
    keep_by: str
    baseline: bool
    max_snapshot_bytes: int | None
    shard_probe: bool
    compute_dtype: str
    cross_layer: bool | Sequence[float]
    cross_layer_reference: str
    heatmap_time_share: float
