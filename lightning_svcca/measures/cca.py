"""The CCA family: :func:`cca`, :func:`svcca` (and :func:`svcca_details`), :func:`pwcca`, :func:`r2cca`.

In-sample measures, invariant to any invertible linear map of either side (SVCCA: once its kept directions are
chosen); the held-out versions are in :mod:`lightning_svcca.measures.heldout`. Each centres and decomposes both
sides (:func:`~lightning_svcca.measures.decompose`; the scale-free ones on unit-norm columns, so the rank does not
depend on a neuron's scale) and takes the canonical correlations from ``M = Ux^T Uy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_svcca.measures._checks import KeepBy, check_keep, warn_if_few_datapoints
from lightning_svcca.measures._compute import canonical_correlations, pwcca_from_cross
from lightning_svcca.measures.decomposition import Decomposition, cross_product, decompose_pair

__all__ = ["CCAResult", "cca", "pwcca", "r2cca", "svcca", "svcca_details"]


@dataclass(frozen=True)
class CCAResult:
    """SVCCA in detail: the value together with what it was computed from.

    Attributes:
        value: 0-dim tensor, the mean of ``correlations``.
        correlations: ``(min(kept_x, kept_y),)`` canonical correlations in ``[0, 1]``, descending.
        kept: number of singular directions kept of ``x`` and of ``y``.
        rank: numerical rank of ``x`` and of ``y`` before truncation.
    """

    value: Tensor
    correlations: Tensor
    kept: tuple[int, int]
    rank: tuple[int, int]


def cca(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    epsilon: float = 0.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Canonical correlations between the column spaces of the centred ``x`` and ``y``.

    CCA finds pairs of directions ``(x a_i, y b_i)`` of maximal correlation, each pair uncorrelated with the
    previous ones. With ``Ux`` and ``Uy`` orthonormal bases of the centred columns, the correlations are the
    singular values of ``Ux^T Uy``, i.e. the cosines of the principal angles between the two subspaces
    (Björck & Golub 1973).

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition`.
        y: ``(n, d2)`` representation of the same ``n`` datapoints, or its :class:`Decomposition`.
        epsilon: ridge added to the diagonal of each covariance matrix ``Xc^T Xc / (n - 1)`` (regularised CCA,
            as google/svcca's ``cca_core``); ``0`` is plain CCA.
        dtype: precision of the decompositions, ``torch.float64`` (default) or ``torch.float32``.

    Returns:
        Tensor of shape ``(min(rank(x), rank(y)),)``: canonical correlations in ``[0, 1]``, descending.

    Raises:
        ValueError: a side is not 2-D, the numbers of datapoints differ, fewer than 2 datapoints, NaN or Inf,
            or a negative ``epsilon``.
        ZeroVarianceError: a side has no variance.

    Notes:
        Directions whose singular value is below the rounding error of the input or of the decomposition are
        null (rank-deficient layers, duplicated or dead neurons, ``d > n``): they are dropped rather than
        divided by, so the result is never NaN and never above 1.

    Example:
        >>> x = torch.randn(200, 3, dtype=torch.float64)
        >>> rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
        >>> cca(x, x @ rotation).round(decimals=6)
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    if not epsilon >= 0:  # also refuses NaN
        raise ValueError(f"epsilon must be >= 0 (a ridge on the covariances), got {epsilon}")
    # plain CCA does not depend on a column's scale: decide the rank on unit-norm columns (a ridge does depend on it)
    dx, dy, cross_gram = decompose_pair(x, y, dtype, standardize=epsilon == 0)
    warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "cca", stacklevel=3)
    cross = cross_product(dx, dy, cross_gram=cross_gram)
    if epsilon > 0:
        cross = _ridge(dx, epsilon)[:, None] * cross * _ridge(dy, epsilon)[None, :]
    return canonical_correlations(cross)


def svcca(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    keep: float | int = 0.99,
    keep_by: KeepBy = "singular_values",
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """SVCCA similarity (Raghu et al. 2017): mean canonical correlation of the top singular directions.

    1. Centre each side and take its SVD.
    2. Keep, on each side, the fewest leading singular directions whose cumulative sum reaches ``keep`` of the
       total. ``keep_by="singular_values"`` (default) sums singular values, as the paper's Appendix A and
       google's tutorial do; ``keep_by="variance"`` sums squared singular values (explained variance) and so
       keeps far fewer directions. An ``int`` ``keep`` keeps exactly that many (at most the rank).
    3. CCA between the kept subspaces; return the plain mean of the canonical correlations.

    SVCCA is invariant to rotation, isotropic scaling and translation of either side; with ``keep=1.0`` it
    is invariant to any invertible linear map. Use :func:`svcca_details` for the correlations and the
    kept dimensions as well.

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition`.
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        keep: fraction in ``(0, 1]`` of the singular value (or variance) total to keep, or a number of
            directions.
        keep_by: ``"singular_values"`` or ``"variance"``.
        dtype: precision of the decompositions, ``torch.float64`` (default) or ``torch.float32``.

    Returns:
        0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes or values (see :func:`cca`), ``keep`` out of range, unknown ``keep_by``.
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(500, 10, dtype=torch.float64)
        >>> round(float(svcca(x, 3.0 * x + 1.0)), 6)
        1.0
    """
    return _svcca(x, y, keep, keep_by, dtype).value


def svcca_details(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    keep: float | int = 0.99,
    keep_by: KeepBy = "singular_values",
    *,
    dtype: torch.dtype = torch.float64,
) -> CCAResult:
    """:func:`svcca` with its canonical correlations and kept dimensions, computed once.

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition`.
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        keep: see :func:`svcca`.
        keep_by: see :func:`svcca`.
        dtype: precision of the decompositions.

    Returns:
        A :class:`CCAResult`.

    Example:
        >>> x = torch.randn(1000, 20, dtype=torch.float64)
        >>> result = svcca_details(x, x, keep=5)
        >>> result.kept, result.correlations.shape
        ((5, 5), torch.Size([5]))
    """
    return _svcca(x, y, keep, keep_by, dtype)


def _svcca(
    x: Tensor | Decomposition, y: Tensor | Decomposition, keep: float | int, keep_by: KeepBy, dtype: torch.dtype
) -> CCAResult:
    keep = check_keep(keep, keep_by, stacklevel=4)
    dx, dy, cross_gram = decompose_pair(x, y, dtype)
    kept_x, kept_y = dx.kept(keep, keep_by), dy.kept(keep, keep_by)
    warn_if_few_datapoints(dx.n_datapoints, max(kept_x, kept_y), "svcca", stacklevel=4)
    correlations = canonical_correlations(cross_product(dx, dy, kept_x, kept_y, cross_gram=cross_gram))
    return CCAResult(correlations.mean(), correlations, (kept_x, kept_y), (dx.rank, dy.rank))


def pwcca(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Projection-weighted CCA (Morcos, Raghu & Bengio 2018), weights taken from ``x``.

    .. math::
        \mathrm{PWCCA}(x, y) = \frac{\sum_i \alpha_i \rho_i}{\sum_i \alpha_i}, \qquad
        \alpha_i = \sum_j \lvert \langle h_i, x_j \rangle \rvert

    where ``rho_i`` are the canonical correlations, ``h_i`` the orthonormal canonical variates of ``x``
    (``Ux a_i``, with ``a_i`` the left singular vectors of ``Ux^T Uy``) and ``x_j`` the centred neurons (columns)
    of ``x``. Directions that account for much of ``x`` count more, so noise directions with spurious
    correlations matter less than in the plain mean.

    This follows the paper. google/svcca's ``compute_pwcca`` departs from it: it weights by projections that
    are not the canonical variates of ``x``, and raises ``IndexError`` when ``x`` has more neurons than ``y``;
    here any widths work. PWCCA is not symmetric: swap the arguments to weight by ``y``.

    Args:
        x: ``(n, d1)`` representation whose neurons give the weights, or its :class:`Decomposition` (with
            ``right`` kept).
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        dtype: precision of the decompositions.

    Returns:
        0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes or values (see :func:`cca`), or a decomposition of ``x`` without ``right``.
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(500, 6, dtype=torch.float64)
        >>> round(float(pwcca(x, x @ torch.randn(6, 6, dtype=torch.float64))), 6)
        1.0
    """
    dx, dy, cross_gram = decompose_pair(x, y, dtype, standardize=True)
    warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "pwcca", stacklevel=3)
    return pwcca_from_cross(dx, cross_product(dx, dy, cross_gram=cross_gram))


def r2cca(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Mean squared canonical correlation, :math:`R^2_{CCA}` (Kornblith et al. 2019, Table 1).

    .. math::
        R^2_{\mathrm{CCA}}(x, y) = \frac{1}{k} \sum_{i=1}^{k} \rho_i^2 = \frac{\lVert U_x^\top U_y \rVert_F^2}{k},
        \qquad k = \min(\mathrm{rank}\,x, \mathrm{rank}\,y)

    the fraction of the smaller side's variance that a linear map of the other explains, averaged over its
    canonical directions. Like :func:`cca`, invariant to any invertible linear map of either side; squaring
    makes weak (often noise) correlations count less than in the plain mean.

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition`.
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        dtype: precision of the decompositions.

    Returns:
        0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes or values (see :func:`cca`).
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(400, 6, dtype=torch.float64)
        >>> round(float(r2cca(x, x @ torch.randn(6, 6, dtype=torch.float64) + 5.0)), 6)
        1.0
    """
    dx, dy, cross_gram = decompose_pair(x, y, dtype, standardize=True)
    warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "r2cca", stacklevel=3)
    cross = cross_product(dx, dy, cross_gram=cross_gram)
    return (cross.square().sum() / min(cross.shape)).clamp(0.0, 1.0)


def _ridge(decomposition: Decomposition, epsilon: float) -> Tensor:
    """Per-direction factor ``sqrt(lambda / (lambda + epsilon))`` of a covariance ridge, ``lambda = s^2/(n-1)``."""
    variances = decomposition.singular_values.square() / (decomposition.n_datapoints - 1)
    return torch.sqrt(variances / (variances + epsilon))
