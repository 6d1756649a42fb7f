"""Representational similarity analysis (Kriegeskorte, Mur and Bandettini 2008): correlation of dissimilarities.

Each representation gives a representational dissimilarity matrix (RDM): how far apart every two datapoints
are. :func:`rsa` correlates the upper triangles of the two RDMs (Spearman by default, the neuroscience
convention, or Pearson). Every RDM here follows from an ``n x n`` matrix of similarities or inner products of the
rows (:func:`sample_gram`), so the training-time snapshots, which hold the rows up to a rotation of the features,
give the same value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_svcca.measures._checks import ZeroVarianceError
from lightning_svcca.measures._samples import checked_pair, unit_rows

__all__ = [
    "DISTANCES",
    "RSA_METHODS",
    "rdm_from_gram",
    "rsa",
    "sample_gram",
    "spearman_side",
    "upper_dissimilarities",
]

Distance = Literal["correlation", "cosine", "euclidean"]
Method = Literal["spearman", "pearson"]
DISTANCES = ("correlation", "cosine", "euclidean")
RSA_METHODS = ("spearman", "pearson")


def check_rsa_options(method: str, distance: str) -> None:
    """Raise unless ``method`` and ``distance`` are supported."""
    if method not in RSA_METHODS:
        raise ValueError(f"method must be one of {RSA_METHODS}, got {method!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def sample_gram(x: Tensor, distance: str) -> Tensor:
    """The matrix a distance is read from: similarities for ``"correlation"`` and ``"cosine"``, a Gram for the other.

    Rows centred over their features (``"correlation"``) or as they are (``"cosine"``), scaled to unit length
    (a row without direction stays zero), so that ``X X^T`` holds the correlations or cosines; for
    ``"euclidean"`` the Gram matrix of the rows moved by the first row (distances do not see a translation;
    moving by a datapoint rather than the mean removes a large offset while keeping integer data integer, so tied
    distances stay tied, as in scipy).
    """
    if distance == "euclidean":
        rows = x - x[:1]
    else:
        rows = unit_rows(x - x.mean(dim=1, keepdim=True) if distance == "correlation" else x)
    return rows @ rows.T


def rdm_from_gram(matrix: Tensor, distance: str) -> Tensor:
    """The ``n x n`` dissimilarities from :func:`sample_gram`'s matrix: ``1 - similarity``, or Euclidean."""
    if distance == "euclidean":
        norms = matrix.diagonal()
        return (norms[:, None] + norms[None, :] - 2.0 * matrix).clamp_min(0.0).sqrt()
    return 1.0 - matrix


def _sorted_ranks(ordered: Tensor) -> Tensor:
    """Ranks from 1 of sorted values, in their order; tied values share the mean of their ranks (scipy's "average")."""
    if not bool((ordered[1:] == ordered[:-1]).any()):  # no ties (the usual case): ranks 1..m in sorted order
        return torch.arange(1, ordered.numel() + 1, dtype=ordered.dtype, device=ordered.device)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).to(ordered.dtype)
    return (last - (counts.to(ordered.dtype) - 1.0) / 2.0)[group]


def upper_dissimilarities(matrix: Tensor, distance: str, upper: Tensor) -> Tensor:
    """The RDM's entries above the diagonal (``upper``: their indices), from :func:`sample_gram`'s matrix.

    Only the ``n (n - 1) / 2`` entries are formed (the Euclidean ones from the Gram's diagonal and those entries).
    """
    if distance == "euclidean":
        norms = matrix.diagonal()
        squared = norms[upper[0]] + norms[upper[1]] - 2.0 * matrix[upper[0], upper[1]]
        return squared.clamp_min(0.0).sqrt()
    return 1.0 - matrix[upper[0], upper[1]]


def spearman_side(matrix: Tensor, distance: str, method: str, name: str, upper: Tensor | None = None) -> Tensor:
    """One side of RSA: its RDM's upper triangle (ranked for Spearman), centred and scaled to unit norm.

    RSA is the dot product of the two sides' vectors. ``upper``: ``triu_indices(n, n, 1)``, when the caller has
    them (both sides share them).

    Raises:
        ZeroVarianceError: the RDM does not vary.
    """
    n = matrix.shape[0]
    if upper is None:
        upper = torch.triu_indices(n, n, offset=1, device=matrix.device)
    if method == "spearman":
        return _ranked_side(matrix, distance, upper, name)
    rdm = upper_dissimilarities(matrix, distance, upper)
    centred = rdm - rdm.mean()
    norm = centred.norm()
    if not float(norm) > _flat_below(float(rdm.abs().max()), rdm.numel(), rdm.dtype):
        raise _constant_rdm(name, distance)
    return centred.div_(norm)


def _ranked_side(matrix: Tensor, distance: str, upper: Tensor, name: str) -> Tensor:
    """:func:`spearman_side` for Spearman: the RDM's ranks, centred and scaled in sorted order, then put in place.

    A dissimilarity ``1 - s`` ranks as ``s`` does, reversed: the similarities are sorted as they are and the
    scale takes the sign, so no ``1 - s`` is formed. Ranks 1..m centred by their mean ``(m + 1) / 2`` (exact:
    they sum to ``m (m + 1) / 2`` with or without ties) are scaled before the one scatter into pair order.
    """
    values = upper_dissimilarities(matrix, distance, upper) if distance == "euclidean" else matrix[upper[0], upper[1]]
    ordered, order = values.sort()
    del values
    m = ordered.numel()
    ranks = _sorted_ranks(ordered)
    largest = float(ranks[-1])
    centred = ranks.sub_((m + 1) / 2.0)
    norm = float(centred.norm())
    if not norm > _flat_below(largest, m, ranks.dtype):
        raise _constant_rdm(name, distance)
    centred.mul_((1.0 if distance == "euclidean" else -1.0) / norm)
    return torch.empty_like(centred).index_copy_(0, order, centred)


def _flat_below(largest: float, count: int, dtype: torch.dtype) -> float:
    """The norm of a centred RDM vector below which its variation is rounding: it does not vary."""
    return 1e3 * torch.finfo(dtype).eps * largest * count**0.5


def _constant_rdm(name: str, distance: str) -> ZeroVarianceError:
    return ZeroVarianceError(
        f"every two datapoints of {name} are equally dissimilar ({distance} distance), so its RDM does not"
        " vary and has no correlation; a constant layer, or a distance that cannot tell its datapoints apart"
        " (correlation distance of a single feature)"
    )


def rsa(
    x: Tensor,
    y: Tensor,
    method: Method = "spearman",
    distance: Distance = "correlation",
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Representational similarity analysis: the correlation of the two representational dissimilarity matrices.

    .. math::
        \mathrm{RSA}(x, y) = \rho\big(\{D^x_{ij}\}_{i<j}, \{D^y_{ij}\}_{i<j}\big), \qquad
        D^x_{ij} = 1 - \mathrm{corr}(x_i, x_j)

    with :math:`\mathrm{corr}(x_i, x_j)` the Pearson correlation of two datapoints across features (``distance=
    "correlation"``, ``scipy.spatial.distance.pdist``'s ``"correlation"``), ``1 - cosine`` (``"cosine"``) or
    the Euclidean distance (``"euclidean"``); :math:`\rho` is Spearman's rank correlation (ties get their mean
    rank, as ``scipy.stats.spearmanr``) or Pearson's. Invariant to rotations and isotropic scaling of either
    side with ``"cosine"`` and ``"euclidean"`` (and translation with ``"euclidean"``); ``"correlation"``
    depends on the feature basis (it centres each datapoint over its features) and is invariant to permuting
    features, scaling, and adding a constant to every feature of a datapoint. A datapoint whose features are all
    equal (correlation) or zero (cosine) has no direction: its similarity to every other is taken as 0
    (dissimilarity 1) rather than undefined. Costs ``O(n^2 d)`` time, ``O(n^2)`` memory.

    Args:
        x: ``(n, d1)`` representation, ``n >= 3``.
        y: ``(n, d2)`` representation of the same datapoints.
        method: ``"spearman"`` or ``"pearson"``.
        distance: ``"correlation"``, ``"cosine"`` or ``"euclidean"``.
        dtype: precision of the dissimilarities.

    Returns:
        0-dim tensor in ``[-1, 1]``.

    Raises:
        ValueError: bad shapes, NaN or Inf, fewer than 3 datapoints, an unknown method or distance.
        ZeroVarianceError: a side has no variance, or its RDM does not vary.

    Example:
        >>> x = torch.randn(50, 6, dtype=torch.float64)
        >>> round(float(rsa(x, 2.0 * x + 1.0)), 6)
        1.0
    """
    check_rsa_options(method, distance)
    x, y = checked_pair(x, y, dtype, 3)
    # 1. each side's RDM upper triangle, ranked (Spearman), centred and scaled: one n x n matrix at a time;
    # 2. the Pearson correlation of the two.
    n = x.shape[0]
    upper = torch.triu_indices(n, n, offset=1, device=x.device)
    side_x = spearman_side(sample_gram(x, distance), distance, method, "x", upper)
    side_y = spearman_side(sample_gram(y, distance), distance, method, "y", upper)
    return torch.dot(side_x, side_y).clamp(-1.0, 1.0)
