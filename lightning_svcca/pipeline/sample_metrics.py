"""The sample-level metrics (mutual k-NN, CKNNA, minibatch CKA, RSA) from two stored snapshots.

A snapshot holds the centred activations up to a rotation of the features, ``R = U diag(s) = Xc V``, which is
all that translation-invariant measures need (minibatch CKA, Euclidean RDMs). Cosine neighbours and correlation
RDMs also need what centring removed; :attr:`Snapshot.affine <lightning_svcca.pipeline.snapshot.Snapshot.affine>`
keeps it in ``r + 1`` numbers per row (``m = V^T mu``, ``|mu|^2``; ``a = V^T 1``, ``mu . 1``), from which the
exact Gram matrices follow:

* uncentred rows ``X = Xc + 1 mu^T``: ``X X^T = (R + 1 m^T)(R + 1 m^T)^T + (|mu|^2 - |m|^2) 1 1^T``
  (``mu``'s part outside the stored directions adds the same to every entry);
* rows centred over their features, ``X (I - 1 1^T / d)``: ``X X^T - u u^T / d`` with ``u = X 1 = R a + (mu . 1) 1``.

So every value equals the public function's on the raw activations, to the float32 storage of ``U``. Settings
used by the monitor: ``k = min(10, n - 1)``, chunks of :data:`MINIBATCH_ROWS` probe rows, Spearman RSA of
correlation distances (the functions' defaults).
"""

from __future__ import annotations

import math

from torch import Tensor

from lightning_svcca.measures._checks import ZeroVarianceError
from lightning_svcca.measures._samples import cosine_from_gram
from lightning_svcca.measures.minibatch import MinibatchCKA, chunk_bounds
from lightning_svcca.measures.neighbors import cknna_from_grams, mutual_knn_from_grams
from lightning_svcca.measures.rsa import rsa_from_grams
from lightning_svcca.pipeline.snapshot import Snapshot

__all__ = ["AFFINE_METRICS", "MINIBATCH_ROWS", "NEIGHBOURS", "SAMPLE_METRICS", "sample_metric"]

#: The sample-level metrics, all computed from the snapshots' rows.
SAMPLE_METRICS = ("mutual_knn", "cknna", "minibatch_cka", "rsa")
#: Those that also need the snapshot's affine part (not translation-invariant).
AFFINE_METRICS = ("mutual_knn", "cknna", "rsa")
#: Neighbours per datapoint of mutual_knn and cknna (fewer when the probe has at most this many rows).
NEIGHBOURS = 10
#: Probe rows per chunk of minibatch_cka (the probe's default batch size).
MINIBATCH_ROWS = 256


def uncentred_gram(snapshot: Snapshot, rows: Tensor) -> Tensor:
    """``X X^T`` of the raw activations, from the snapshot's rows ``R`` (permuted as the pair asks) and affine part."""
    affine = _affine(snapshot, rows)
    coords, mean_sq = affine[0, :-1], affine[0, -1]
    shifted = rows + coords
    return shifted @ shifted.T + (mean_sq - coords.square().sum()).clamp_min(0.0)


def feature_centred_gram(snapshot: Snapshot, rows: Tensor) -> Tensor:
    """``Xr Xr^T`` of the activations with each row centred over its features (correlation distances)."""
    affine = _affine(snapshot, rows)
    sums = rows @ affine[1, :-1] + affine[1, -1]
    return uncentred_gram(snapshot, rows) - sums[:, None] * sums[None, :] / snapshot.n_features


def sample_metric(metric: str, a: Snapshot, b: Snapshot, rows_a: Tensor, rows_b: Tensor) -> float:
    """The value of a sample-level ``metric`` for two snapshots whose rows ``U diag(s)`` are given.

    A value the data leave undefined (an RDM that does not vary) is NaN, and its row is dropped.
    """
    n = rows_a.shape[0]
    try:
        if metric == "minibatch_cka":
            accumulator = MinibatchCKA(dtype=rows_a.dtype)
            for start, stop in chunk_bounds(n, MINIBATCH_ROWS):
                accumulator.update(rows_a[start:stop], rows_b[start:stop])
            return float(accumulator.compute())
        if metric == "rsa":
            # correlations of the datapoints across features: the feature-centred Gram, scaled to cosines
            similar_a = cosine_from_gram(feature_centred_gram(a, rows_a))
            similar_b = cosine_from_gram(feature_centred_gram(b, rows_b))
            return float(rsa_from_grams(similar_a, similar_b, "correlation", "spearman"))
        gram_a, gram_b = uncentred_gram(a, rows_a), uncentred_gram(b, rows_b)
        k = min(NEIGHBOURS, n - 1)
        if metric == "mutual_knn":
            return float(mutual_knn_from_grams(gram_a, gram_b, k))
        return float(cknna_from_grams(gram_a, gram_b, k))
    except ZeroVarianceError:
        return math.nan


def _affine(snapshot: Snapshot, like: Tensor) -> Tensor:
    if snapshot.affine is None:
        raise ValueError(
            "this snapshot was stored before snapshots kept their mean (Snapshot.affine), which mutual_knn, cknna"
            " and rsa need; measure these metrics in a new run, or resume without them"
        )
    return snapshot.affine.to(device=like.device, dtype=like.dtype)
