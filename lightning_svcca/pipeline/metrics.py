"""The metrics of snapshot comparisons: each from the cross product ``Ua^T Ub`` of two stored bases.

:data:`METRIC_TABLE` holds what each metric is and takes (one :class:`Metric` each); every module that needs a
property of a metric asks it (:func:`metrics_where`, :func:`metric_info`) instead of keeping its own list.
:func:`pair_for` says which directions of two snapshots a metric compares, :func:`cross_products` forms the
products (each process summing over its share of the probe rows, in one collective), :func:`measure` turns one
into a value, and :func:`evaluate` does all three for many ``(metric, pair)`` jobs, each distinct product once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_svcca.measures._compute import (
    canonical_correlations,
    cka_from_cross,
    debiased_cka_from_cross,
    procrustes_from_cross,
    pwcca_from_cross,
    rbf_cka_from_rows,
)
from lightning_svcca.measures.decomposition import Decomposition
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
from lightning_svcca.pipeline.sample_metrics import AFFINE_METRICS, SAMPLE_METRICS, SampleCache, sample_metric
from lightning_svcca.pipeline.snapshot import Collective, Snapshot

__all__ = [
    "METRICS",
    "METRIC_TABLE",
    "Metric",
    "Pair",
    "cross_products",
    "evaluate",
    "measure",
    "metric_info",
    "metrics_where",
    "pair_for",
    "snapshot_needs",
]


@dataclass(frozen=True)
class Metric:
    """What one metric is, and what computing it takes.

    Attributes:
        name: the metric's name (in ``metrics=``, history rows and tags).
        kept_only: compares the SVCCA-kept directions only; every other metric needs all of them (full-rank
            snapshots).
        from_rows: computed from the snapshots' rows ``U diag(s)`` rather than from ``Ua^T Ub``.
        needs_right: weights by neurons, so it needs the right singular vectors.
        scale_free: does not see a column's scale: on raw tensors, decomposed on unit-norm columns.
        held_out: directions fitted on folds, correlations scored on held-out datapoints: computed from the data
            itself (no decomposition reuse).
        float32_safe: a float32 decomposition computes it accurately. The Gram route squares singular values, so
            float32 only resolves directions down to about 1% of the largest: CKA weights directions by their
            variance and barely notices, but SVCCA's kept set (and so its value) can change by several hundredths
            on ill-conditioned layers.
        convergence: a similarity a freeze rule may read (``FreezePolicy(metric=...)``).
        sample: a sample-level measure (mutual k-NN, CKNNA, minibatch CKA, RSA) computed from the rows and the
            centring the snapshot removed (:mod:`~lightning_svcca.pipeline.sample_metrics`): from the data, no
            decomposition reuse.
    """

    name: str
    kept_only: bool = False
    from_rows: bool = False
    needs_right: bool = False
    scale_free: bool = False
    held_out: bool = False
    float32_safe: bool = False
    convergence: bool = False
    sample: bool = False


#: Every metric a snapshot comparison can compute, in order. The in-sample CCA family (svcca, pwcca, cca, r2cca)
#: and the variance-weighted measures (linear_cka, linear_cka_debiased, procrustes) follow from the cross product
#: of two stored bases; rbf_cka, the held-out measures and the sample-level ones (mutual_knn, cknna,
#: minibatch_cka, rsa: :mod:`~lightning_svcca.pipeline.sample_metrics`) need the datapoints themselves, which a
#: full-rank snapshot gives up to a rotation (``U diag(s) = Xc V``: distances, and CCA fits, do not see the
#: rotation).
METRIC_TABLE = (
    Metric("svcca", kept_only=True, convergence=True),
    Metric("pwcca", needs_right=True, scale_free=True, convergence=True),
    Metric("cca", scale_free=True, convergence=True),
    Metric("linear_cka", float32_safe=True, convergence=True),
    Metric("r2cca", scale_free=True),
    Metric("procrustes"),
    Metric("linear_cka_debiased"),
    Metric("rbf_cka", from_rows=True),
    Metric("cca_heldout", from_rows=True, held_out=True),
    Metric("svcca_heldout", from_rows=True, held_out=True),
    Metric("pwcca_heldout", from_rows=True, needs_right=True, held_out=True),
    *(Metric(name, from_rows=True, sample=True) for name in SAMPLE_METRICS),
)
METRICS = tuple(entry.name for entry in METRIC_TABLE)
_BY_NAME = {entry.name: entry for entry in METRIC_TABLE}


def metric_info(name: str) -> Metric:
    """The table entry of a metric.

    Raises:
        ValueError: an unknown metric.
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
    return _BY_NAME[name]


def metrics_where(prop: str) -> tuple[str, ...]:
    """The metrics with a property, in table order.

    Example:
        >>> metrics_where("needs_right")
        ('pwcca', 'pwcca_heldout')
    """
    return tuple(entry.name for entry in METRIC_TABLE if getattr(entry, prop))


def snapshot_needs(metrics: Sequence[str]) -> tuple[bool, bool, bool]:
    """What :func:`build_snapshot` must store for ``metrics``: ``(full_rank, with_right, with_affine)``.

    Only ``"svcca"`` can do with the SVCCA-kept directions; every other metric needs all directions
    (``full_rank``). ``"pwcca"`` and ``"pwcca_heldout"`` weight by neurons, so they need the right singular
    vectors (``with_right``). ``mutual_knn``, ``cknna`` and ``rsa`` read the raw datapoints, so they need what
    centring removed (``with_affine``: :attr:`Snapshot.affine`).

    Raises:
        ValueError: an unknown metric.

    Example:
        >>> snapshot_needs(["svcca"]), snapshot_needs(["svcca", "linear_cka"]), snapshot_needs(["pwcca", "rsa"])
        ((False, False, False), (True, False, False), (True, True, True))
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    entries = [_BY_NAME[name] for name in metrics]
    return (
        any(not entry.kept_only for entry in entries),
        any(entry.needs_right for entry in entries),
        any(name in AFFINE_METRICS for name in metrics),
    )


@dataclass(frozen=True)
class Pair:
    """Two snapshots to compare, with how many leading directions of each to use.

    ``shuffle`` permutes the datapoints of ``b`` (the noise baseline).
    """

    a: Snapshot
    b: Snapshot
    kept_a: int
    kept_b: int
    shuffle: Tensor | None = None


def cross_products(
    pairs: Sequence[Pair], collective: Collective, *, device: torch.device, dtype: torch.dtype = torch.float64
) -> list[Tensor]:
    """``Ua^T Ub`` for every pair, each process summing over its share of the rows, in one collective.

    The stored bases are float32 and their products are taken in float32, then returned in ``dtype``: their
    rounding (measured: below 5e-8 in the correlations at n = 32768) stays under the float32 storage error
    itself, and the products run twice as fast as in float64 with no copies. Each basis goes to ``device``
    once per pair group (a few recent ones are kept there).
    """
    if not pairs:
        return []
    for pair in pairs:
        if pair.a.n_datapoints != pair.b.n_datapoints:
            raise ValueError(
                f"cannot compare snapshots over {pair.a.n_datapoints} and {pair.b.n_datapoints} datapoints: a"
                " reference must see the same probe datapoints"
            )
    n = pairs[0].a.n_datapoints
    start, stop = n * collective.rank // collective.world_size, n * (collective.rank + 1) // collective.world_size
    recent: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def rows(snapshot: Snapshot, shuffle: Tensor | None = None) -> Tensor:
        """This process's rows of a basis (of its shuffled datapoints), on the device."""
        key = (id(snapshot), id(shuffle))
        if key not in recent:
            left = snapshot.left
            # index_select: a row gather several times faster than advanced indexing on the CPU
            local = left[start:stop] if shuffle is None else left.index_select(0, shuffle[start:stop])
            recent[key] = local.to(device=device)
            if len(recent) > 4:
                recent.popitem(last=False)
        return recent[key]

    partials = [
        (rows(pair.a)[:, : pair.kept_a].T @ rows(pair.b, pair.shuffle)[:, : pair.kept_b]).to(dtype) for pair in pairs
    ]
    if collective.world_size == 1:
        return partials  # nothing to sum: no flat copy to split again
    summed = collective.sum(torch.cat([partial.reshape(-1) for partial in partials]))
    products, offset = [], 0
    for partial in partials:
        products.append(summed[offset : offset + partial.numel()].reshape(partial.shape))
        offset += partial.numel()
    return products


def pair_for(metric: str, a: Snapshot, b: Snapshot, shuffle: Tensor | None = None) -> Pair:
    """The pair of bases ``metric`` needs: the SVCCA-kept directions, or all stored ones."""
    if metric in _BY_NAME and _BY_NAME[metric].kept_only:
        return Pair(a, b, min(a.kept, a.left.shape[1]), min(b.kept, b.left.shape[1]), shuffle)
    return Pair(a, b, a.left.shape[1], b.left.shape[1], shuffle)


def measure(metric: str, pair: Pair, cross: Tensor, cache: SampleCache | None = None) -> float:
    """The value of ``metric`` for a pair, from its cross product ``Ua^T Ub`` (or the snapshots' rows).

    ``cache`` keeps what the sample-level metrics take from each snapshot across the pairs of one call.

    The held-out metrics use their functions' defaults (5 folds, seed 0, ridge picked on a dev part) on the
    rows ``U diag(s)`` (``U diag(s) V^T``, the centred activations, for ``pwcca_heldout``).
    """
    if metric in ("svcca", "cca"):
        return float(canonical_correlations(cross).mean())
    if metric == "r2cca":
        return float(cross.square().sum() / min(cross.shape))
    if metric in SAMPLE_METRICS:
        return sample_metric(metric, pair.a, pair.b, pair.shuffle, cache or SampleCache(cross.dtype, cross.device))
    if metric in _BY_NAME and _BY_NAME[metric].from_rows:
        return _measure_rows(metric, pair, cross)
    a, b = _spectrum(pair.a, cross), _spectrum(pair.b, cross)
    if metric == "pwcca":
        return float(pwcca_from_cross(a, cross))
    if metric == "linear_cka":
        return float(cka_from_cross(a, b, cross))
    if metric == "procrustes":
        return float(procrustes_from_cross(a, b, cross))
    if metric == "linear_cka_debiased":
        a, b = _with_rows(pair.a, None, cross), _with_rows(pair.b, pair.shuffle, cross)
        return float(debiased_cka_from_cross(a, b, cross))
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def _with_rows(snapshot: Snapshot, shuffle: Tensor | None, like: Tensor) -> Decomposition:
    """A snapshot as a decomposition with its basis (datapoints permuted by ``shuffle``), on ``like``'s device."""
    left = snapshot.left if shuffle is None else snapshot.left[shuffle.to(snapshot.left.device)]
    return Decomposition(
        snapshot.singular_values.to(device=like.device, dtype=like.dtype),
        None,
        left.to(device=like.device, dtype=like.dtype),
        None,
        None,
        snapshot.n_datapoints,
        snapshot.n_features,
    )


def _measure_rows(metric: str, pair: Pair, cross: Tensor) -> float:
    """Metrics that need the datapoints: from ``U diag(s)`` (full-rank snapshots) of each side."""
    for snapshot in (pair.a, pair.b):
        if snapshot.left.shape[1] < snapshot.rank:
            raise ValueError(f"{metric} needs full-rank snapshots; build them with snapshot_needs(metrics)")
    rows_a = _with_rows(pair.a, None, cross)
    rows_b = _with_rows(pair.b, pair.shuffle, cross)
    x = rows_a.left * rows_a.singular_values
    y = rows_b.left * rows_b.singular_values
    if metric == "rbf_cka":
        return float(rbf_cka_from_rows(x, y, 1.0))
    if metric == "cca_heldout":
        return float(cca_heldout(x, y).mean())
    if metric == "svcca_heldout":
        # the run's keep is applied through the stored count of kept directions
        return float(svcca_heldout(x[:, : pair.a.kept], y[:, : pair.b.kept], keep=1.0))
    if pair.a.right is None:
        raise ValueError("pwcca_heldout needs the right singular vectors; build snapshots with with_right=True")
    return float(pwcca_heldout(x @ pair.a.right.to(x).T, y))


def _spectrum(snapshot: Snapshot, like: Tensor) -> Decomposition:
    """The singular values and right vectors of a snapshot as a basis-free decomposition, on ``like``'s device."""
    right = None if snapshot.right is None else snapshot.right.to(device=like.device, dtype=like.dtype)
    singular_values = snapshot.singular_values.to(device=like.device, dtype=like.dtype)
    return Decomposition(singular_values, right, None, None, None, snapshot.n_datapoints, snapshot.n_features)


def evaluate(
    jobs: Sequence[tuple[str, Pair]],
    collective: Collective,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """The value of each ``(metric, pair)``: every distinct cross product once, all in one collective.

    This is how a snapshot is compared with many references at once, and how the "final" pass compares every
    stored epoch with the last one: no decomposition is recomputed, and metrics that need the same directions
    (cca, pwcca, linear_cka) share one product.
    """
    slots: dict[tuple[int, int, int, int, int], int] = {}
    pairs: list[Pair] = []
    for _, pair in jobs:
        key = _pair_key(pair)
        if key not in slots:
            slots[key] = len(pairs)
            pairs.append(pair)
    products = cross_products(pairs, collective, device=device, dtype=dtype)
    cache = SampleCache(dtype, device)
    return [measure(metric, pair, products[slots[_pair_key(pair)]], cache) for metric, pair in jobs]


def _pair_key(pair: Pair) -> tuple[int, int, int, int, int]:
    return (id(pair.a), id(pair.b), pair.kept_a, pair.kept_b, id(pair.shuffle))
