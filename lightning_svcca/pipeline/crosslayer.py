"""Every layer against every layer: the layers x layers map of one similarity measure.

:func:`cross_layer_similarity` compares two sets of per-layer representations (raw activations or
:class:`~lightning_svcca.pipeline.snapshot.Snapshot` s) under any measure of
:data:`~lightning_svcca.pipeline.metrics.METRICS`. Layers may differ in width (every measure accepts different
widths) and in datapoints per sample: a conv layer recorded at its positions has ``samples x positions`` rows, and
two layers with different spatial sizes cannot be matched row by row. As Raghu et al. (2017, Sec. 4) and Kornblith
et al. (2019, Sec. 6) do for layers of different resolutions, such layers are pooled to one datapoint per sample
(the mean over its positions, :func:`pool_by_sample`) first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_svcca.core.table import format_table
from lightning_svcca.measures import Decomposition, cca, decompose, linear_cka, procrustes, pwcca, r2cca, rbf_cka, svcca
from lightning_svcca.measures._checks import KeepBy
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
from lightning_svcca.measures.minibatch import minibatch_cka
from lightning_svcca.measures.neighbors import cknna, mutual_knn
from lightning_svcca.measures.rsa import rsa
from lightning_svcca.pipeline.metrics import METRICS, evaluate, metric_info, pair_for
from lightning_svcca.pipeline.sample_metrics import MINIBATCH_ROWS, NEIGHBOURS
from lightning_svcca.pipeline.snapshot import LocalCollective, Snapshot

__all__ = ["LayerMap", "cross_layer_similarity", "pool_by_sample"]


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
        return format_table(header, body)


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
            :class:`~lightning_svcca.pipeline.snapshot.Snapshot` (built with ``snapshot_needs([metric])``).
        b: the same for the other model or moment. ``a`` and ``b`` may be the same mapping.
        metric: one of :data:`lightning_svcca.pipeline.metrics.METRICS`.
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
    entry = metric_info(metric)
    if entry.held_out or entry.sample:  # computed from the data themselves: no decomposition to reuse
        return rows
    return decompose(rows, standardize=entry.scale_free)  # scale-free measures: unit-norm columns


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
        # the settings of the snapshot metrics (pipeline/sample_metrics.py), so both routes give one value
        "mutual_knn": lambda x, y: mutual_knn(x, y, k=min(NEIGHBOURS, x.shape[0] - 1)),
        "cknna": lambda x, y: cknna(x, y, k=min(NEIGHBOURS, x.shape[0] - 1)),
        "minibatch_cka": lambda x, y: minibatch_cka(x, y, batch_size=MINIBATCH_ROWS),
        "rsa": rsa,
    }
    return functions[metric]
