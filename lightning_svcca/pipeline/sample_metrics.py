"""The sample-level metrics (mutual k-NN, CKNNA, minibatch CKA, RSA) from two stored snapshots.

A snapshot holds the centred activations up to a rotation of the features, ``R = U diag(s) = Xc V``, which is
all that translation-invariant measures need (minibatch CKA, Euclidean RDMs). Cosine neighbours and correlation
RDMs also need what centring removed; :attr:`Snapshot.affine <lightning_svcca.pipeline.snapshot.Snapshot.affine>`
keeps it in ``r + 1`` numbers per row (``m = V^T mu``, ``|mu|^2``; ``a = V^T 1``, ``mu . 1``), from which the
exact Gram matrices follow:

* uncentred rows ``X = Xc + 1 mu^T``: ``X X^T = Z Z^T`` with ``Z = [R + 1 m^T, sqrt(|mu|^2 - |m|^2) 1]``
  (``mu``'s part outside the stored directions adds the same to every entry);
* rows centred over their features, ``X (I - 1 1^T / d)``: ``X X^T - u u^T / d`` with ``u = X 1 = R a + (mu . 1) 1``.

So every value equals the public function's on the raw activations, to the float32 storage of ``U``. Settings
used by the monitor: ``k = min(10, n - 1)``, chunks of :data:`MINIBATCH_ROWS` probe rows, Spearman RSA of
correlation distances (the functions' defaults).

A measurement compares each new snapshot with several others (``previous``, the shuffled baseline, ``final``):
:class:`SampleCache` keeps what one snapshot gives every comparison (its neighbour keys and the cosines there, its
RDM's ranks) for the few most recent snapshots of one :func:`~lightning_svcca.pipeline.metrics.evaluate` call, so each
``n x n`` matrix is formed once per snapshot, not once per pair and metric.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_svcca.measures._checks import ZeroVarianceError
from lightning_svcca.measures._samples import cosine_from_gram, sparse_unbiased_hsic
from lightning_svcca.measures.minibatch import MinibatchCKA
from lightning_svcca.measures.neighbors import neighbours, own_alignment_warning
from lightning_svcca.measures.rsa import spearman_side
from lightning_svcca.pipeline.snapshot import Snapshot

__all__ = ["AFFINE_METRICS", "MINIBATCH_ROWS", "NEIGHBOURS", "SAMPLE_METRICS", "SampleCache", "sample_metric"]

#: The sample-level metrics, all computed from the snapshots' rows.
SAMPLE_METRICS = ("mutual_knn", "cknna", "minibatch_cka", "rsa")
#: Those that also need the snapshot's affine part (not translation-invariant).
AFFINE_METRICS = ("mutual_knn", "cknna", "rsa")
#: Neighbours per datapoint of mutual_knn and cknna (fewer when the probe has at most this many rows).
NEIGHBOURS = 10
#: Probe rows per chunk of minibatch_cka (the probe's default batch size).
MINIBATCH_ROWS = 256


def centred_rows(snapshot: Snapshot, shuffle: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``U diag(s)`` of a full-rank snapshot (its datapoints permuted by ``shuffle``), in ``dtype``."""
    if snapshot.left.shape[1] < snapshot.rank:
        raise ValueError("the sample-level metrics need full-rank snapshots; build them with snapshot_needs(metrics)")
    left = snapshot.left if shuffle is None else snapshot.left[shuffle.to(snapshot.left.device)]
    return left.to(dtype) * snapshot.singular_values.to(device=left.device, dtype=dtype)


def uncentred_rows(snapshot: Snapshot, rows: Tensor) -> Tensor:
    """``Z`` with ``Z Z^T = X X^T`` of the raw activations, from the rows ``R`` and the affine part."""
    affine = _affine(snapshot, rows)
    coords, mean_sq = affine[0, :-1], affine[0, -1]
    outside = (mean_sq - coords.square().sum()).clamp_min(0.0).sqrt()
    return torch.cat([rows + coords, outside.expand(rows.shape[0], 1)], dim=1)


def uncentred_gram(snapshot: Snapshot, rows: Tensor) -> Tensor:
    """``X X^T`` of the raw activations, from the snapshot's rows ``R`` (permuted as the pair asks) and affine part."""
    z = uncentred_rows(snapshot, rows)
    return z @ z.T


def feature_centred_gram(snapshot: Snapshot, rows: Tensor) -> Tensor:
    """``Xr Xr^T`` of the activations with each row centred over its features (correlation distances)."""
    affine = _affine(snapshot, rows)
    sums = rows @ affine[1, :-1] + affine[1, -1]
    return uncentred_gram(snapshot, rows) - sums[:, None] * sums[None, :] / snapshot.n_features


class SampleCache:
    """What each snapshot (with a datapoint shuffle or not) gives the sample metrics, for a few snapshots at once.

    Entries hold their snapshot and shuffle, so the ids keying them cannot be reused while cached.

    Args:
        dtype: precision of the rows and matrices.
        device: where they are computed (``None``: the snapshots' device).
        size: entries kept (each at most an RDM's ``n (n - 1) / 2`` ranks).
    """

    def __init__(self, dtype: torch.dtype = torch.float64, device: torch.device | None = None, size: int = 6) -> None:
        self.dtype = dtype
        self.device = device
        self.size = size
        self._entries: OrderedDict[tuple[str, int, int], tuple[Any, Any, Any]] = OrderedDict()

    def get(self, kind: str, snapshot: Snapshot, shuffle: Tensor | None, build: Callable[[], Any]) -> Any:
        """The cached ``kind`` of ``(snapshot, shuffle)``, built by ``build()`` when missing."""
        key = (kind, id(snapshot), id(shuffle))
        if key in self._entries:
            self._entries.move_to_end(key)
        else:
            self._entries[key] = (snapshot, shuffle, build())
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return self._entries[key][2]

    def rows(self, snapshot: Snapshot, shuffle: Tensor | None) -> Tensor:
        """``U diag(s)`` (permuted by ``shuffle``)."""
        return self.get(
            "rows", snapshot, shuffle, lambda: centred_rows(snapshot, shuffle, self.dtype).to(device=self.device)
        )

    def neighbours(self, snapshot: Snapshot, shuffle: Tensor | None, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The sorted k-NN pair keys, the cosines there, and the masked kernel's unbiased HSIC with itself."""

        def build() -> tuple[Tensor, Tensor, Tensor]:
            if shuffle is not None:  # the unshuffled neighbours renumbered (HSIC does not see a permutation)
                keys, values, own = self.neighbours(snapshot, None, k)
                n, order = snapshot.n_datapoints, shuffle.to(keys.device)
                position = torch.empty_like(order).index_copy_(0, order, torch.arange(n, device=order.device))
                moved, where = (position[keys // n] * n + position[keys % n]).sort()
                return moved, values[where], own
            keys, values = neighbours(uncentred_rows(snapshot, self.rows(snapshot, None)), k)
            return keys, values, sparse_unbiased_hsic(keys, values, keys, values, snapshot.n_datapoints)

        return self.get(f"neighbours{k}", snapshot, shuffle, build)

    def ranks(self, snapshot: Snapshot, shuffle: Tensor | None) -> Tensor:
        """The correlation-distance RDM's upper triangle, ranked, centred and scaled to unit norm."""

        def build() -> Tensor:
            if shuffle is not None:  # the unshuffled ranks, read at each shuffled pair's place: no second sort
                n, base = snapshot.n_datapoints, self.ranks(snapshot, None)
                order = shuffle.to(base.device)
                upper = torch.triu_indices(n, n, offset=1, device=base.device)
                i, j = order[upper[0]], order[upper[1]]
                low, high = torch.minimum(i, j), torch.maximum(i, j)
                return base[low * (2 * n - low - 1) // 2 + high - low - 1]
            similar = cosine_from_gram(feature_centred_gram(snapshot, self.rows(snapshot, None)))
            return spearman_side(similar, "correlation", "spearman", "x")

        return self.get("ranks", snapshot, shuffle, build)


def sample_metric(
    metric: str, a: Snapshot, b: Snapshot, shuffle: Tensor | None = None, cache: SampleCache | None = None
) -> float:
    """The value of a sample-level ``metric`` for two snapshots (``b``'s datapoints permuted by ``shuffle``).

    A value the data leave undefined (an RDM that does not vary) is NaN, and its row is dropped.
    """
    cache = cache or SampleCache()
    try:
        if metric == "minibatch_cka":
            return _minibatch(cache.rows(a, None), cache.rows(b, shuffle))
        if metric == "rsa":
            return float(torch.dot(cache.ranks(a, None), cache.ranks(b, shuffle)).clamp(-1.0, 1.0))
    except ZeroVarianceError:
        return math.nan
    k = min(NEIGHBOURS, a.n_datapoints - 1)
    keys_a, values_a, own_a = cache.neighbours(a, None, k)
    keys_b, values_b, own_b = cache.neighbours(b, shuffle, k)
    shared = torch.isin(keys_a, keys_b, assume_unique=True)
    if metric == "mutual_knn":
        return float(shared.sum()) / keys_a.numel()
    # CKNNA: the kernels' values at the mutual pairs are already at hand on both sides (no n x n matrix)
    mutual = keys_a[shared]
    cross = sparse_unbiased_hsic(
        mutual, values_a[shared], mutual, values_b[torch.searchsorted(keys_b, mutual)], a.n_datapoints
    )
    if not (float(own_a) > 0 and float(own_b) > 0):
        own_alignment_warning(k, own_a, own_b, stacklevel=3)
        return 0.0
    return float(cross / (own_a * own_b).sqrt())


def _minibatch(rows_a: Tensor, rows_b: Tensor) -> float:
    accumulator = MinibatchCKA(dtype=rows_a.dtype)
    accumulator.add_rows(rows_a, rows_b, MINIBATCH_ROWS)
    return float(accumulator.compute())


def _affine(snapshot: Snapshot, like: Tensor) -> Tensor:
    if snapshot.affine is None:
        raise ValueError(
            "this snapshot was stored before snapshots kept their mean (Snapshot.affine), which mutual_knn, cknna"
            " and rsa need; measure these metrics in a new run, or resume without them"
        )
    return snapshot.affine.to(device=like.device, dtype=like.dtype)
