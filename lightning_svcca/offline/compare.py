"""Compare two models (or two moments of one model) layer by layer, and every layer with every other.

Two pieces, both Lightning-free:

* :func:`cross_layer_similarity`: the layers x layers map of one measure between two sets of per-layer
  representations (raw activations or :class:`~lightning_svcca.pipeline.snapshots.Snapshot` s). Layers may differ in
  width (every measure accepts different widths) and in datapoints per sample: a conv layer recorded at its
  positions has ``samples x positions`` rows, and two layers with different spatial sizes cannot be matched row
  by row. As Raghu et al. (2017, Sec. 4) and Kornblith et al. (2019, Sec. 6) do for layers of different
  resolutions, such layers are pooled to one datapoint per sample (the mean over its positions) first.
* :func:`compare_models`: run one probe through two models, record the same layers of both, and return the
  layers x metrics table of each layer against its counterpart, plus the cross-layer map. The CLI's
  ``compare`` command prints it for two checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca.measures import (
    Decomposition,
    cca,
    decompose,
    linear_cka,
    procrustes,
    pwcca,
    r2cca,
    rbf_cka,
    svcca,
)
from lightning_svcca.measures._checks import KeepBy
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
from lightning_svcca.pipeline.activations import ActivationRecorder, Reduction, probe_share, resolve_layers
from lightning_svcca.pipeline.metrics import METRICS, evaluate, pair_for, snapshot_needs
from lightning_svcca.pipeline.probe import batch_size, build_probe, run_probe
from lightning_svcca.pipeline.snapshot import LocalCollective, Snapshot, build_snapshot

__all__ = ["LayerMap", "ModelComparison", "compare_models", "cross_layer_similarity", "pool_by_sample"]

#: Measures that do not depend on a column's scale: their decompositions are taken on unit-norm columns.
_SCALE_FREE = ("cca", "pwcca", "r2cca")
#: Measures computed from the data themselves (no decomposition reuse).
_FROM_DATA = ("cca_heldout", "svcca_heldout", "pwcca_heldout")


@dataclass(frozen=True)
class LayerMap:
    """A layers x layers similarity matrix.

    Attributes:
        rows: layers of the first representation set (matrix rows), in the given order.
        columns: layers of the second set (matrix columns).
        values: ``(len(rows), len(columns))`` float64 tensor; ``values[i, j]`` compares ``rows[i]`` with
            ``columns[j]``.
        metric: the measure.
    """

    rows: list[str]
    columns: list[str]
    values: Tensor
    metric: str

    def to_text(self, digits: int = 3) -> str:
        """The matrix as an aligned text table."""
        header = [f"{self.metric}", *self.columns]
        body = [[row, *(f"{float(v):.{digits}f}" for v in self.values[i])] for i, row in enumerate(self.rows)]
        return _format(header, body)


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
            _format(["layer", *metrics], body)
            + f"\n\ncross-layer {self.cross_layer.metric} (rows: model A, columns: model B)\n"
            + self.cross_layer.to_text(digits)
        )

    def __str__(self) -> str:
        return self.to_text()


def pool_by_sample(rows: Tensor, sample_ids: Tensor) -> Tensor:
    """Mean of the rows that belong to each sample: ``(rows, d)`` -> ``(samples, d)``, samples in id order.

    Args:
        rows: ``(rows, d)`` datapoints (e.g. conv positions).
        sample_ids: ``(rows,)`` the sample each row comes from.
    """
    if rows.shape[0] != sample_ids.shape[0]:
        raise ValueError(f"sample_ids has {sample_ids.shape[0]} entries for {rows.shape[0]} rows")
    ids, index = torch.unique(sample_ids, return_inverse=True)
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    total = torch.zeros(ids.shape[0], rows.shape[1], dtype=dtype, device=rows.device)
    total.index_add_(0, index, rows.to(dtype))
    counts = torch.bincount(index, minlength=ids.shape[0]).to(dtype)
    return total / counts[:, None]


def cross_layer_similarity(
    a: Mapping[str, Tensor | Snapshot],
    b: Mapping[str, Tensor | Snapshot],
    metric: str = "svcca",
    *,
    keep: float | int = 0.99,
    keep_by: KeepBy = "singular_values",
    sample_ids_a: Mapping[str, Tensor] | None = None,
    sample_ids_b: Mapping[str, Tensor] | None = None,
) -> LayerMap:
    """Every layer of ``a`` against every layer of ``b`` under one measure.

    Args:
        a: layer name -> representation: a 2-D ``(datapoints, features)`` tensor, an ``(N, C, *spatial)``
            channels-first tensor (averaged over its spatial positions), or a full-rank
            :class:`~lightning_svcca.pipeline.snapshots.Snapshot` (built with ``snapshot_needs([metric])``).
        b: the same for the other model or moment. ``a`` and ``b`` may be the same mapping.
        metric: one of :data:`lightning_svcca.pipeline.snapshots.METRICS`.
        keep: SVCCA's ``keep`` for tensors (snapshots carry their own kept count).
        keep_by: SVCCA's ``keep_by``.
        sample_ids_a: layer -> ``(rows,)`` sample of each row, for layers with several rows per sample (conv
            positions, frames): when two compared layers' row counts differ, both are pooled to one datapoint
            per sample with :func:`pool_by_sample`.
        sample_ids_b: the same for ``b``.

    Returns:
        A :class:`LayerMap` with ``a``'s layers as rows and ``b``'s as columns.

    Raises:
        ValueError: an unknown metric, an empty mapping, or two layers with different datapoint counts that
            cannot be pooled (no sample ids, or snapshots).
        TypeError: tensors and snapshots mixed.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not a or not b:
        raise ValueError("cross_layer_similarity needs at least one layer on each side")
    values = list(a.values()) + list(b.values())
    if all(isinstance(v, Snapshot) for v in values):
        return _map_from_snapshots(a, b, metric)
    if any(isinstance(v, Snapshot) for v in values):
        raise TypeError("give either tensors or snapshots for every layer, not a mix")
    rows_a = _as_rows(a, sample_ids_a)
    rows_b = rows_a if b is a else _as_rows(b, sample_ids_b)
    counts = {rows.shape[0] for rows, _ in (*rows_a.values(), *rows_b.values())}
    if len(counts) > 1:
        rows_a, rows_b = _pooled(rows_a), _pooled(rows_b)
        detail = {
            f"{side}:{name}": t.shape[0] for side, r in (("a", rows_a), ("b", rows_b)) for name, (t, _) in r.items()
        }
        if len(set(detail.values())) > 1:
            raise ValueError(
                f"layers have different numbers of datapoints {detail}; give sample_ids_a / sample_ids_b for layers"
                " with several rows per sample, so that they are pooled to one datapoint per sample"
            )
    function = _measure_function(metric, keep, keep_by)
    prepared_a = {name: _prepare(rows, metric) for name, (rows, _) in rows_a.items()}
    prepared_b = prepared_a if b is a else {name: _prepare(rows, metric) for name, (rows, _) in rows_b.items()}
    matrix = torch.tensor(
        [[float(function(prepared_a[i], prepared_b[j])) for j in prepared_b] for i in prepared_a],
        dtype=torch.float64,
    ).reshape(len(prepared_a), len(prepared_b))
    return LayerMap(list(prepared_a), list(prepared_b), matrix, metric)


def compare_models(
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
        metrics: measures for the per-layer table, from :data:`lightning_svcca.pipeline.snapshots.METRICS`.
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
        ValueError: unknown metrics or layers, a layer missing from ``model_b``, or no layer ran.
    """
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one measure")
    cross_layer_metric = cross_layer_metric or metrics[0]
    full_rank, with_right = snapshot_needs([*metrics, cross_layer_metric])
    probe = build_probe(probe, _loader_size(probe), input_key=input_key, needs_input=forward_fn is None)
    specs = resolve_layers(model_a, layers, reduction)
    resolve_layers(model_b, [spec.name for spec in specs], reduction)  # the same names must exist in B
    if device is None:
        device = next((p.device for p in model_a.parameters()), torch.device("cpu"))
    device = torch.device(device)
    recorders = [
        _record(model, probe, specs, max_datapoints, probe_batch_size, device, forward_fn)
        for model in (model_a, model_b)
    ]
    names = [name for name in recorders[0].order if all(name in r.activations for r in recorders)]
    if not names:
        raise ValueError("none of the layers ran in both models' forward pass; check layers and forward_fn")
    snapshot = _snapshot_builder(keep, keep_by, full_rank, with_right, dtype)
    snapshots = [{name: snapshot(r.activations[name], r.input_eps[name], name) for name in names} for r in recorders]
    jobs = [(metric, pair_for(metric, snapshots[0][name], snapshots[1][name])) for name in names for metric in metrics]
    values = iter(evaluate(jobs, LocalCollective(), device=torch.device("cpu"), dtype=dtype))
    table = [{"layer": name, **{metric: next(values) for metric in metrics}} for name in names]
    # one datapoint per sample (the mean over all positions), so that layers of different spatial sizes compare
    if any(r.activations[name].shape[0] != probe.size for r in recorders for name in names):
        mean_specs = [replace(spec, reduction="mean") for spec in specs if spec.name in names]
        recorders = [
            _record(model, probe, mean_specs, max_datapoints, probe_batch_size, device, forward_fn)
            for model in (model_a, model_b)
        ]
    pooled = [{name: snapshot(_pooled_rows(r, name), r.input_eps[name], name) for name in names} for r in recorders]
    cross = _map_from_snapshots(pooled[0], pooled[1], cross_layer_metric)
    return ModelComparison(table, cross)


# ----------------------------------------------------------------------------------------------------------------
# Pieces.
# ----------------------------------------------------------------------------------------------------------------


def _loader_size(probe: Any) -> int | None:
    """The number of samples of a DataLoader probe (all of them are used), or ``None`` for other probes."""
    return len(probe.dataset) if isinstance(probe, DataLoader) else None  # type: ignore[arg-type]


def _record(
    model: nn.Module,
    probe: Any,
    specs: list,
    max_datapoints: int,
    chunk_size: int,
    device: torch.device,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
) -> ActivationRecorder:
    """Run the whole probe through ``model`` with hooks on the layers (as the callback's ``_record``)."""
    recorder = ActivationRecorder(model, specs, per_sample=probe_share(max_datapoints, probe.size))

    def before_chunk(first: int, chunk: Any) -> None:
        recorder.start_chunk(first, probe.lengths(chunk), batch_size(chunk), device)

    with recorder:
        run_probe(model, probe, chunk_size=chunk_size, device=device, forward_fn=forward_fn, before_chunk=before_chunk)
    return recorder


def _pooled_rows(recorder: ActivationRecorder, name: str) -> Tensor:
    """One row per sample (sequence layers may still give several frames under reduction="mean" masks)."""
    return pool_by_sample(recorder.activations[name], recorder.sample_ids[name])


def _snapshot_builder(
    keep: float | int, keep_by: str, full_rank: bool, with_right: bool, dtype: torch.dtype
) -> Callable[[Tensor, float, str], Snapshot]:
    def build(rows: Tensor, input_eps: float, name: str) -> Snapshot:
        return build_snapshot(
            rows,
            LocalCollective(),
            name=name,
            keep=keep,
            keep_by=keep_by,
            full_rank=full_rank,
            with_right=with_right,
            input_eps=input_eps,
            dtype=dtype,
        )

    return build


def _map_from_snapshots(a: Mapping[str, Snapshot], b: Mapping[str, Snapshot], metric: str) -> LayerMap:
    """The layers x layers map from snapshots: every distinct cross product once (``snapshots.evaluate``)."""
    counts = {s.n_datapoints for s in (*a.values(), *b.values())}
    if len(counts) > 1:
        raise ValueError(
            f"the snapshots hold different numbers of datapoints {sorted(counts)}: build them from activations"
            " pooled to one datapoint per sample (pool_by_sample, or reduction='mean')"
        )
    jobs = [(metric, pair_for(metric, a[i], b[j])) for i in a for j in b]
    values = evaluate(jobs, LocalCollective(), device=torch.device("cpu"))
    return LayerMap(list(a), list(b), torch.tensor(values, dtype=torch.float64).reshape(len(a), len(b)), metric)


def _as_rows(
    representations: Mapping[str, Tensor], sample_ids: Mapping[str, Tensor] | None
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """2-D rows for each layer (spatial outputs averaged over positions), with their sample ids if known."""
    out = {}
    for name, tensor in representations.items():
        tensor = torch.as_tensor(tensor)
        ids = None if sample_ids is None else sample_ids.get(name)
        if tensor.ndim > 2:
            if ids is not None:
                raise ValueError(f"layer {name!r}: sample ids go with 2-D rows, got a {tensor.ndim}-D tensor")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], -1).mean(dim=2)
        out[name] = (tensor, ids)
    return out


def _pooled(rows: dict[str, tuple[Tensor, Tensor | None]]) -> dict[str, tuple[Tensor, None]]:
    """Layers with sample ids pooled to one row per sample; the others as they are."""
    return {
        name: (tensor if ids is None else pool_by_sample(tensor, ids), None) for name, (tensor, ids) in rows.items()
    }


def _prepare(rows: Tensor, metric: str) -> Tensor | Decomposition:
    """Decompose once per layer where the measure can reuse it."""
    if metric in _FROM_DATA:
        return rows
    return decompose(rows, standardize=metric in _SCALE_FREE)


def _measure_function(metric: str, keep: float | int, keep_by: str) -> Callable[[Any, Any], Tensor]:
    functions: dict[str, Callable[[Any, Any], Tensor]] = {
        "svcca": lambda x, y: svcca(x, y, keep, keep_by),
        "cca": lambda x, y: cca(x, y).mean(),
        "pwcca": pwcca,
        "linear_cka": linear_cka,
        "r2cca": r2cca,
        "procrustes": procrustes,
        "linear_cka_debiased": lambda x, y: linear_cka(x, y, debiased=True),
        "rbf_cka": rbf_cka,
        "cca_heldout": lambda x, y: cca_heldout(x, y).mean(),
        "svcca_heldout": lambda x, y: svcca_heldout(x, y, keep, keep_by),
        "pwcca_heldout": pwcca_heldout,
    }
    return functions[metric]


def _format(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
