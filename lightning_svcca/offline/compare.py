"""Compare two models (or two moments of one model) layer by layer, and every layer with every other.

:func:`compare_models` runs one probe through two models, records the same layers of both (the callback's
:class:`~lightning_svcca.pipeline.capture.Capture`), and returns the layers x metrics table of each layer against
its counterpart, plus the cross-layer map (:func:`~lightning_svcca.pipeline.crosslayer.cross_layer_similarity`,
with conv positions pooled to one datapoint per sample). The CLI's ``compare`` command prints it for two
checkpoints. Lightning-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca.core.table import format_table
from lightning_svcca.measures._checks import KeepBy, check_keep, warn_if_few_datapoints
from lightning_svcca.pipeline.capture import Capture, CaptureOptions
from lightning_svcca.pipeline.crosslayer import LayerMap, cross_layer_similarity, pool_by_sample
from lightning_svcca.pipeline.layers import resolve_layers
from lightning_svcca.pipeline.metrics import evaluate, pair_for, snapshot_needs
from lightning_svcca.pipeline.probe import build_probe
from lightning_svcca.pipeline.recording import ActivationRecorder
from lightning_svcca.pipeline.reduction import Reduction
from lightning_svcca.pipeline.snapshot import LocalCollective

__all__ = ["ModelComparison", "compare_models"]


@dataclass(frozen=True)
class ModelComparison:
    """What :func:`compare_models` found.

    Attributes:
        table: one dict per layer: ``{"layer": name, metric: value, ...}`` for each metric, layers bottom-up.
        cross_layer: every layer of model A against every layer of model B (``cross_layer_metric``).
    """

    table: list[dict[str, Any]]
    cross_layer: LayerMap

    def to_text(self, digits: int = 3) -> str:
        """The per-layer table, then the cross-layer map."""
        metrics = [key for key in self.table[0] if key != "layer"] if self.table else []
        body = [[row["layer"], *(f"{row[m]:.{digits}f}" for m in metrics)] for row in self.table]
        return (
            format_table(["layer", *metrics], body)
            + f"\n\ncross-layer {self.cross_layer.metric} (rows: model A, columns: model B)\n"
            + self.cross_layer.to_text(digits)
        )

    def __str__(self) -> str:
        return self.to_text()


def compare_models(  # noqa: PLR0913 - keyword-only: the monitor's measuring options, one keyword each
    model_a: nn.Module,
    model_b: nn.Module,
    probe: Any,
    layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None = None,
    metrics: Sequence[str] = ("svcca",),
    *,
    cross_layer_metric: str | None = None,
    keep: float | int = 0.99,
    keep_by: KeepBy = "singular_values",
    reduction: Reduction = "positions",
    max_datapoints: int = 4096,
    probe_batch_size: int = 256,
    input_key: int | str | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> ModelComparison:
    """Run ``probe`` through two models and compare each monitored layer with its counterpart.

    The models are run in eval mode without gradients, and left as they were (training flags, RNG state). Each
    layer is compressed to a snapshot, as the callback does, and the table comes from the snapshots; the
    cross-layer map pools conv positions to one datapoint per sample (see the module docstring).

    Args:
        model_a: the first model (e.g. the earlier checkpoint).
        model_b: the second; it must have modules of the same names.
        probe: a tensor (the model input), a batch (tuple, list or dict of tensors) or a DataLoader with a
            known length (see :func:`lightning_svcca.pipeline.probe.build_probe`); all of it is used.
        layers: module names (or the callback's per-layer option mapping); ``None``: the default set of
            ``model_a`` (Linear, Conv, RNN, Transformer layers).
        metrics: measures for the per-layer table, from :data:`lightning_svcca.pipeline.metrics.METRICS`.
        cross_layer_metric: the measure of the cross-layer map (default: the first of ``metrics``).
        keep: SVCCA's ``keep``.
        keep_by: SVCCA's ``keep_by``.
        reduction: how outputs with positions become datapoints (``"positions"``, ``"mean"``, ``"flatten"``).
        max_datapoints: cap on datapoints per layer (positions per sample: ``max_datapoints // samples``).
        probe_batch_size: samples per forward pass.
        input_key: the model input within a batch probe (see ``build_probe``).
        forward_fn: ``forward_fn(model, chunk)``; default ``model(input)``.
        device: where the models run (default: ``model_a``'s parameters' device).
        dtype: precision of the decompositions.

    Returns:
        A :class:`ModelComparison`; ``print(result)`` shows both tables.

    Raises:
        ValueError: unknown metrics or layers, a layer missing from ``model_b``, no layer ran, or a forward pass
            failed (a probe that does not fit a model).
    """
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one measure")
    keep = check_keep(keep, keep_by)  # keep=1.5 was taken, and gave numbers unlike any valid keep
    cross_layer_metric = cross_layer_metric or metrics[0]
    full_rank, with_right, with_affine = snapshot_needs([*metrics, cross_layer_metric])
    probe = build_probe(probe, _loader_size(probe), input_key=input_key)
    specs = resolve_layers(model_a, layers, reduction)
    resolve_layers(model_b, [spec.name for spec in specs], reduction)  # the same names must exist in B
    if device is None:
        device = next((p.device for p in model_a.parameters()), torch.device("cpu"))
    device = torch.device(device)
    options = CaptureOptions(
        probe_batch_size=probe_batch_size,
        forward_fn=forward_fn,
        max_datapoints=max_datapoints,
        keep=keep,
        keep_by=keep_by,
        full_rank=full_rank,
        with_right=with_right,
        with_affine=with_affine,
        dtype=dtype,
        keep_means=True,
    )
    capture = Capture(probe, specs, options, LocalCollective())
    recorders = [
        capture.record(model, device, label=label) for model, label in ((model_a, "model A"), (model_b, "model B"))
    ]
    names = [name for name in recorders[0].order if all(name in r.activations for r in recorders)]
    if not names:
        raise ValueError("none of the layers ran in both models' forward pass; check layers and forward_fn")
    table = _layer_table(capture, recorders, names, metrics, dtype)
    return ModelComparison(table, _cross_layer_map(capture, recorders, names, probe.size, cross_layer_metric))


def _loader_size(probe: Any) -> int | None:
    """The number of samples of a DataLoader probe (all of them are used), or ``None`` for other probes."""
    return len(probe.dataset) if isinstance(probe, DataLoader) else None  # type: ignore[arg-type]


def _layer_table(
    capture: Capture,
    recorders: Sequence[ActivationRecorder],
    names: Sequence[str],
    metrics: Sequence[str],
    dtype: torch.dtype,
) -> list[dict[str, Any]]:
    """Each layer of model A against its counterpart in model B, per metric, from their snapshots."""
    snapshots = [
        {name: capture.compress(r.activations[name], r.input_eps[name], name) for name in names} for r in recorders
    ]
    for name in names:  # too few datapoints for the directions kept bias every similarity towards 1: say so
        kept = max(side[name].kept for side in snapshots)
        warn_if_few_datapoints(snapshots[0][name].n_datapoints, kept, f"layer {name!r}", stacklevel=4)
    jobs = [(metric, pair_for(metric, snapshots[0][name], snapshots[1][name])) for name in names for metric in metrics]
    values = iter(evaluate(jobs, LocalCollective(), device=torch.device("cpu"), dtype=dtype))
    return [{"layer": name, **{metric: next(values) for metric in metrics}} for name in names]


def _cross_layer_map(
    capture: Capture, recorders: Sequence[ActivationRecorder], names: Sequence[str], samples: int, metric: str
) -> LayerMap:
    """Every layer of model A against every layer of model B, on one datapoint per sample.

    Layers of different spatial sizes compare only so: where any layer has other than one row per sample, every
    layer's rows are its means over each sample's positions or valid frames.
    """
    one_row_each = all(r.activations[name].shape[0] == samples for r in recorders for name in names)
    pooled = [
        {name: capture.compress(_per_sample(r, name, one_row_each), r.input_eps[name], name) for name in names}
        for r in recorders
    ]
    return cross_layer_similarity(pooled[0], pooled[1], metric)


def _per_sample(recorder: ActivationRecorder, name: str, one_row_each: bool) -> Tensor:
    """One row per sample: the layer's own rows when every layer has one per sample, else its means.

    The means are over all of a sample's positions or valid frames (``keep_means``).
    """
    if one_row_each:
        return pool_by_sample(recorder.activations[name], recorder.sample_ids[name])
    return recorder.means[name]
