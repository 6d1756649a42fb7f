"""Similarity between two representations of the same datapoints: CCA, SVCCA, PWCCA, CKA, Procrustes.

Measures: :func:`cca`, :func:`svcca`, :func:`pwcca`, :func:`r2cca` (the CCA family, in-sample; held-out versions
are in :mod:`lightning_svcca.measures.heldout`), :func:`linear_cka` (optionally debiased), :func:`rbf_cka` and
:func:`procrustes`. ``docs/measures.md`` says which to use when.

A representation is a 2-D tensor ``(n_datapoints, n_features)``: row ``i`` of ``x`` and row ``i`` of ``y``
describe the same datapoint. Everything here is plain torch (no Lightning): it runs on the inputs' device,
decomposes and accumulates in float64 unless ``dtype=torch.float32`` is asked for. float32 is fast on GPUs but
the Gram route squares singular values, so it only resolves directions down to about ``sqrt(eps * n)`` (1% at
n = 5000) of the largest: fine for linear CKA and for well-conditioned layers, not for CCA of a layer whose
spectrum spans several decades (it would drop directions that float64 keeps).

Every measure is a function of three things: the singular values ``s`` and right singular vectors ``V`` of each
centred side, and the cross product ``M = Ux^T Uy`` of the two sides' orthonormal bases. :class:`Decomposition`
holds the first two; pass one in place of a tensor to compare one side against many others without
decomposing it again.

When ``n_datapoints >= n_features`` a side is decomposed through its Gram matrix ``Xc^T Xc`` (a GEMM and a
small symmetric eigenproblem), and ``M`` comes from the cross-Gram ``Xc^T Yc``: the cost of a comparison is
about the three Gram products (the two own ones formed by their upper blocks only). With fewer datapoints than
features the ``n x n`` kernel ``Xc Xc^T`` takes the Gram matrix's place.

Numerical hygiene: ranks are cut at the data's rounding level; the CCA family decides ranks on unit-norm columns
(it does not depend on a neuron's scale); data whose squares overflow or underflow are rescaled by a power of
two; inputs that require grad give differentiable values (checked with ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from numpy import bool_ as numpy_bool
from torch import Tensor

__all__ = [
    "DATAPOINTS_PER_DIRECTION",
    "CCAResult",
    "Decomposition",
    "SimilarityWarning",
    "TooFewDatapointsWarning",
    "ZeroVarianceError",
    "cca",
    "decompose",
    "linear_cka",
    "procrustes",
    "pwcca",
    "r2cca",
    "rbf_cka",
    "svcca",
    "svcca_details",
]

#: The SVCCA tutorial's advice: at least this many datapoints per kept direction, or CCA is biased upwards.
DATAPOINTS_PER_DIRECTION = 5

KeepBy = Literal["singular_values", "variance"]
_KEEP_BY = ("singular_values", "variance")
_COMPUTE_DTYPES = (torch.float32, torch.float64)


class SimilarityWarning(UserWarning):
    """Base class of the warnings this package emits, so users can filter them in one line."""


class TooFewDatapointsWarning(SimilarityWarning):
    """Too few datapoints for the number of kept directions: similarities are biased towards 1."""


class ZeroVarianceError(ValueError):
    """A representation has no variance (a dead or constant layer): there is nothing to correlate."""


@dataclass(frozen=True)
class Decomposition:
    """Thin SVD ``Xc = U diag(s) V^T`` of one centred representation, cut to its numerical rank.

    Build it with :func:`decompose`. ``left`` (``U``) is kept when the kernel route (``n < d``) was taken; on the
    Gram route the data and its mean are kept instead and ``U`` is never formed, because the cross-Gram with the
    other side (centred a block of rows at a time) is cheaper. Snapshots store ``U`` (and ``V`` only when PWCCA
    needs it) in float32.

    Attributes:
        singular_values: ``(r,)`` singular values, descending, all above the rank tolerance.
        right: ``(n_features, r)`` right singular vectors ``V``, or ``None`` when not kept.
        left: ``(n_datapoints, r)`` orthonormal basis ``U`` of the column space, or ``None``.
        data: ``(n_datapoints, n_features)`` the data as given, kept when ``left`` is ``None``.
        mean: ``(1, n_features)`` column means of ``data`` in the compute dtype, kept with it.
        n_datapoints: number of datapoints (rows) of the representation.
        n_features: number of features (columns) of the representation.
        column_scale: ``(1, n_features)`` factors the centred columns were multiplied by before decomposing
            (``None``: all 1), so that the decomposition is that of ``Xc diag(column_scale)``. Scale-free measures
            (CCA and its relatives) divide each column by its norm, so a column of size 1e-6 next to one of size
            1e6 is not lost to rounding; data too large or too small to square in the compute dtype are scaled
            by a power of two.
    """

    singular_values: Tensor
    right: Tensor | None
    left: Tensor | None
    data: Tensor | None
    mean: Tensor | None
    n_datapoints: int
    n_features: int
    column_scale: Tensor | None = None

    @property
    def rank(self) -> int:
        """Numerical rank: the number of directions with non-negligible variance."""
        return int(self.singular_values.shape[0])

    def kept(self, keep: float | int, keep_by: KeepBy = "singular_values") -> int:
        """Number of leading directions SVCCA keeps for ``keep`` (see :func:`svcca`)."""
        return _kept_count(self.singular_values, keep, keep_by)


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


def decompose(
    x: Tensor | Decomposition, *, dtype: torch.dtype = torch.float64, standardize: bool = False
) -> Decomposition:
    """Centre ``x`` and compute its thin SVD, cut to numerical rank, for reuse across comparisons.

    Args:
        x: ``(n_datapoints, n_features)`` representation; a :class:`Decomposition` is returned as it is.
        dtype: precision of the decomposition, ``torch.float64`` (default) or ``torch.float32``.
        standardize: decompose the columns scaled to unit norm (see :attr:`Decomposition.column_scale`). The
            measures invariant to a column's scale (:func:`cca`, :func:`pwcca`, :func:`r2cca`) do this themselves
            when given tensors; pass ``True`` to reuse one such decomposition with them. SVCCA, CKA and
            Procrustes need the unscaled one.

    Returns:
        The :class:`Decomposition` of the centred ``x``.

    Raises:
        ValueError: ``x`` is not 2-D, has fewer than 2 datapoints, or holds NaN or Inf.
        ZeroVarianceError: every datapoint of ``x`` is the same (no variance above rounding error).

    Example:
        >>> x = torch.randn(100, 8, dtype=torch.float64)
        >>> d = decompose(x)
        >>> d.rank, d.singular_values.shape
        (8, torch.Size([8]))
        >>> bool(svcca(d, x @ torch.randn(8, 8, dtype=torch.float64), keep=1.0) > 0.999)
        True
    """
    if isinstance(x, Decomposition):
        return x
    _check_dtype(dtype)
    x = _check_representation(x, "x")
    return _decompose_checked(x, "x", dtype, standardize=standardize)


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
    dx, dy, cross_gram = _decompose_pair(x, y, dtype, standardize=epsilon == 0)
    _warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "cca", stacklevel=3)
    cross = _cross(dx, dy, cross_gram=cross_gram)
    if epsilon > 0:
        cross = _ridge(dx, epsilon)[:, None] * cross * _ridge(dy, epsilon)[None, :]
    return _correlations(cross)


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
    keep = _check_keep(keep, keep_by, stacklevel=4)
    dx, dy, cross_gram = _decompose_pair(x, y, dtype)
    kept_x, kept_y = dx.kept(keep, keep_by), dy.kept(keep, keep_by)
    _warn_if_few_datapoints(dx.n_datapoints, max(kept_x, kept_y), "svcca", stacklevel=4)
    correlations = _correlations(_cross(dx, dy, kept_x, kept_y, cross_gram=cross_gram))
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
    dx, dy, cross_gram = _decompose_pair(x, y, dtype, standardize=True)
    _warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "pwcca", stacklevel=3)
    return _pwcca_from_cross(dx, _cross(dx, dy, cross_gram=cross_gram))


def linear_cka(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    *,
    debiased: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Linear centred kernel alignment (Kornblith et al. 2019).

    .. math::
        \mathrm{CKA}(x, y) = \frac{\lVert Y_c^\top X_c \rVert_F^2}
            {\lVert X_c^\top X_c \rVert_F \, \lVert Y_c^\top Y_c \rVert_F}

    the HSIC of linear kernels on centred data, normalised. Invariant to orthogonal transforms and isotropic
    scaling of either side, but not to general invertible linear maps (unlike CCA).

    The plain (biased) HSIC estimator makes CKA of independent data about ``d / n`` rather than 0 when there
    are few datapoints per feature. ``debiased=True`` uses the unbiased estimator of Song et al. (2012),
    :math:`\mathrm{HSIC}_1`, in numerator and normalisers (as Kornblith et al.'s code does), which is near 0
    for independent data at any ``n``; it needs ``n >= 4`` and may then be slightly negative.

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition`.
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        debiased: use the unbiased HSIC estimator.
        dtype: precision of the products.

    Returns:
        0-dim tensor, in ``[0, 1]`` (debiased: at most 1, near 0 or slightly below for unrelated data).

    Raises:
        ValueError: bad shapes or values (see :func:`cca`).
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(300, 5, dtype=torch.float64)
        >>> round(float(linear_cka(x, 2.0 * x)), 6)
        1.0
    """
    _check_dtype(dtype)
    if debiased or isinstance(x, Decomposition) or isinstance(y, Decomposition):
        dx, dy, cross_gram = _decompose_pair(x, y, dtype)
        cross = _cross(dx, dy, cross_gram=cross_gram)
        if not debiased:
            return _cka_from_cross(dx, dy, cross)
        if dx.n_datapoints < 4:
            raise ValueError(f"linear_cka(debiased=True) needs at least 4 datapoints, got {dx.n_datapoints}")
        return _debiased_cka_from_cross(dx, dy, cross)
    x = _check_representation(x, "x")
    y = _check_representation(y, "y")
    _check_pair(x, y)
    # 1. centre; 2. HSIC numerator and normalisers from the Gram (or kernel) products.
    mean_x, mean_y = _mean(x, dtype, "x"), _mean(y, dtype, "y")
    n = x.shape[0]
    if n >= max(x.shape[1], y.shape[1]):
        gram_x, gram_y, cross_gram = _block_products(x, mean_x, y, mean_y, own=True)
        cross = cross_gram.square().sum()
    else:
        xc, yc = x.to(dtype) - mean_x, y.to(dtype) - mean_y
        gram_x, gram_y = xc @ xc.T, yc @ yc.T  # the kernel matrices have the same Frobenius norms and traces
        cross = (gram_x * gram_y).sum()
    if _out_of_range(gram_x) or _out_of_range(gram_y):  # beyond about 1e150 or below 1e-150: rescale first
        dx, dy, cross_gram = _decompose_pair(x, y, dtype)
        return _cka_from_cross(dx, dy, _cross(dx, dy, cross_gram=cross_gram))
    norm_x, norm_y = torch.linalg.matrix_norm(gram_x), torch.linalg.matrix_norm(gram_y)
    # 3. a side whose largest singular value (at most sqrt(||Xc^T Xc||_F)) is below its noise floor is constant.
    for name, data, gram, mean, norm in (("x", x, gram_x, mean_x, norm_x), ("y", y, gram_y, mean_y, norm_y)):
        mean_sq = n * float(mean.detach().square().sum())
        floor = _noise_floor(float(gram.detach().diagonal().sum()), mean_sq, n, torch.finfo(data.dtype).eps, dtype)
        if math.sqrt(float(norm.detach())) <= floor:
            raise ZeroVarianceError(_zero_variance_message(name))
    return (cross / (norm_x * norm_y)).clamp(0.0, 1.0)


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
    dx, dy, cross_gram = _decompose_pair(x, y, dtype, standardize=True)
    _warn_if_few_datapoints(dx.n_datapoints, max(dx.rank, dy.rank), "r2cca", stacklevel=3)
    cross = _cross(dx, dy, cross_gram=cross_gram)
    return (cross.square().sum() / min(cross.shape)).clamp(0.0, 1.0)


def procrustes(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Orthogonal Procrustes similarity: one minus the normalised Procrustes distance (Ding et al. 2021).

    With both sides centred and scaled to unit Frobenius norm (:math:`\tilde X = X_c / \lVert X_c \rVert_F`),
    Ding et al. define the distance :math:`d = \min_{Q^\top Q = I} \lVert \tilde X Q - \tilde Y \rVert_F^2
    = 2 - 2 \lVert \tilde X^\top \tilde Y \rVert_*`, in ``[0, 2]``. This returns

    .. math::
        1 - \frac{d}{2} = \frac{\lVert X_c^\top Y_c \rVert_*}{\lVert X_c \rVert_F \, \lVert Y_c \rVert_F}
            = \frac{\lVert S_x U_x^\top U_y S_y \rVert_*}{\lVert s_x \rVert_2 \, \lVert s_y \rVert_2}

    (``||.||_*`` the nuclear norm, the sum of singular values; zero-padding handles different widths). Invariant
    to orthogonal transforms, isotropic scaling and translation of either side, not to other linear maps: like
    linear CKA it weights directions by their variance, but linearly rather than quadratically, so low-variance
    directions count more than in CKA and less than in CCA.

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
        >>> x = torch.randn(300, 5, dtype=torch.float64)
        >>> rotation = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
        >>> round(float(procrustes(x, 3.0 * x @ rotation)), 6)
        1.0
    """
    dx, dy, cross_gram = _decompose_pair(x, y, dtype)
    return _procrustes_from_cross(dx, dy, _cross(dx, dy, cross_gram=cross_gram))


def rbf_cka(
    x: Tensor | Decomposition,
    y: Tensor | Decomposition,
    bandwidth: float = 1.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    r"""Centred kernel alignment with Gaussian (RBF) kernels (Kornblith et al. 2019).

    .. math::
        K_{ij} = \exp\!\Big(-\frac{\lVert x_i - x_j \rVert^2}{2 \sigma_x^2}\Big), \qquad
        \mathrm{CKA} = \frac{\mathrm{tr}(K H L H)}{\sqrt{\mathrm{tr}(K H K H)\, \mathrm{tr}(L H L H)}}

    with ``H`` the centring matrix. Bandwidth rule: ``sigma = bandwidth * median_{i<j} ||x_i - x_j||`` on each
    side (the median over distinct pairs; Kornblith's code takes the median of the full squared-distance
    matrix, diagonal zeros included, which gives a slightly smaller ``sigma``). Invariant to orthogonal
    transforms, translation and, through the median rule, isotropic scaling. Costs ``O(n^2)`` memory: fine for
    probes of a few thousand datapoints.

    Args:
        x: ``(n, d1)`` representation, or its :class:`Decomposition` (its rows ``U diag(s)`` are the centred data
            up to a rotation, which distances do not see).
        y: ``(n, d2)`` representation of the same datapoints, or its :class:`Decomposition`.
        bandwidth: factor on the median pairwise distance, ``> 0``; small values make the kernel local.
        dtype: precision of the decompositions and kernels.

    Returns:
        0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes or values (see :func:`cca`), ``bandwidth <= 0``, or more than half of the pairs
            of datapoints coincide (the median distance is 0).
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(200, 4, dtype=torch.float64)
        >>> round(float(rbf_cka(x, 2.0 * x + 1.0)), 6)
        1.0
    """
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 (a factor on the median distance), got {bandwidth}")
    dx, dy, _ = _decompose_pair(x, y, dtype)
    return _rbf_cka_from_rows(_rows(dx), _rows(dy), bandwidth)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces of the kernel and Procrustes measures (also used by the snapshot store).
# ----------------------------------------------------------------------------------------------------------------


def _rows(decomposition: Decomposition) -> Tensor:
    """The centred datapoints up to a rotation of their coordinates: ``U diag(s)`` (or ``Xc W`` itself)."""
    d = decomposition
    dtype = d.singular_values.dtype
    if d.left is not None:
        return d.left.to(dtype) * d.singular_values
    centred = d.data.to(dtype) - d.mean
    return centred if d.column_scale is None else centred * d.column_scale


def _procrustes_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
    """``||Sx M Sy||_* / (||sx|| ||sy||)`` from the spectra and ``M = Ux^T Uy``."""
    sx = dx.singular_values
    sy = dy.singular_values.to(sx.dtype)
    nuclear = torch.linalg.svdvals(sx[:, None] * cross * sy[None, :]).sum()
    return (nuclear / (sx.norm() * sy.norm())).clamp(0.0, 1.0)


def _rbf_kernel(rows: Tensor, bandwidth: float, name: str) -> Tensor:
    """Centred RBF kernel ``H K H`` of the rows, bandwidth ``bandwidth`` times the median pairwise distance."""
    n = rows.shape[0]
    dot = rows @ rows.T
    norms = dot.diagonal()
    distances_sq = (norms[:, None] + norms[None, :] - 2.0 * dot).clamp_min(0.0)
    upper = torch.triu_indices(n, n, offset=1, device=rows.device)
    pairs = distances_sq[upper[0], upper[1]]
    half = pairs.numel() // 2  # the median of an even count is the mean of the middle two, as numpy's
    median_sq = pairs.kthvalue(half + 1).values
    if pairs.numel() % 2 == 0:
        median_sq = 0.5 * (median_sq + pairs.kthvalue(half).values)
    if not float(median_sq.detach()) > 0:
        raise ValueError(
            f"{name}: more than half of the pairs of datapoints coincide, so the median distance (the RBF"
            " bandwidth's scale) is 0; remove duplicated datapoints"
        )
    kernel = torch.exp(-distances_sq / (2.0 * bandwidth**2 * median_sq))
    return kernel - kernel.mean(dim=0, keepdim=True) - kernel.mean(dim=1, keepdim=True) + kernel.mean()


def _rbf_cka_from_rows(rows_x: Tensor, rows_y: Tensor, bandwidth: float) -> Tensor:
    """RBF CKA of two sets of centred rows (same datapoints, same order)."""
    kx, ky = _rbf_kernel(rows_x, bandwidth, "x"), _rbf_kernel(rows_y.to(rows_x.dtype), bandwidth, "y")
    return ((kx * ky).sum() / (kx.norm() * ky.norm())).clamp(0.0, 1.0)


def _debiased_cka_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator of Song et al. (2012), from spectra, ``M`` and row norms.

    For centred data (``K 1 = 0``), with ``d_K = diag(K)`` (squared row norms) and ``K~`` the kernel with its
    diagonal zeroed: ``tr(K~ L~) = tr(KL) - d_K.d_L``, ``1^T K~ 1 = -tr K`` and ``1^T K~ L~ 1 = d_K.d_L``, so

        HSIC_1(K, L) = [tr(KL) - d_K.d_L + tr(K) tr(L) / ((n-1)(n-2)) - 2 d_K.d_L / (n-2)] / (n (n-3))

    and ``tr(KL) = ||Sx M Sy||_F^2``, ``tr(K^2) = sum(sx^4)``, ``tr(K) = sum(sx^2)``.
    """
    n = dx.n_datapoints
    sx = dx.singular_values
    sy = dy.singular_values.to(sx.dtype)
    rows_x, rows_y = _rows(dx), _rows(dy).to(sx.dtype)
    diag_x, diag_y = rows_x.square().sum(dim=1), rows_y.square().sum(dim=1)
    # the rows of a Gram-route decomposition are the data themselves: use its own (unscaled-spectrum) traces
    trace_x, trace_y = diag_x.sum(), diag_y.sum()

    def hsic(kl: Tensor, dk: Tensor, dl: Tensor, tk: Tensor, tl: Tensor) -> Tensor:
        dot = (dk * dl).sum()
        return (kl - dot + tk * tl / ((n - 1) * (n - 2)) - 2.0 * dot / (n - 2)) / (n * (n - 3))

    xy = hsic((sx[:, None] * cross * sy[None, :]).square().sum(), diag_x, diag_y, trace_x, trace_y)
    xx = hsic(sx.pow(4).sum(), diag_x, diag_x, trace_x, trace_x)
    yy = hsic(sy.pow(4).sum(), diag_y, diag_y, trace_y, trace_y)
    return xy / (xx * yy).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces (also used by the snapshot store, which holds decompositions rather than data).
# ----------------------------------------------------------------------------------------------------------------


def _check_representation(x: object, name: str) -> Tensor:
    """Return ``x`` as a floating 2-D tensor with at least two datapoints and finite entries, or raise."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor (n_datapoints, n_features), got {type(x).__name__}") from err
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_datapoints, n_features), got shape {tuple(x.shape)}; reduce conv or sequence"
            " outputs first, e.g. lightning_svcca.pipeline.reduction.reduce_output"
        )
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 datapoints (rows) to centre, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no features (columns): shape {tuple(x.shape)}")
    return x


def _check_pair(x: Tensor, y: Tensor) -> None:
    """Raise unless ``x`` and ``y`` describe the same datapoints on the same device."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of datapoints (rows), got {x.shape[0]} and {y.shape[0]}; rows are"
            " datapoints, columns are neurons (transpose google/svcca-style inputs)"
        )
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")


def _check_keep(keep: float | int, keep_by: str, *, stacklevel: int = 3) -> float | int:
    """Return ``keep`` as a Python float in (0, 1] or int >= 1 (numpy scalars accepted), or raise.

    ``keep=1`` (an int) keeps one direction, which is rarely meant (``keep=1.0`` keeps all): it warns.
    """
    if keep_by not in _KEEP_BY:
        raise ValueError(f"keep_by must be one of {_KEEP_BY}, got {keep_by!r}")
    if isinstance(keep, (bool, numpy_bool)) or not isinstance(keep, (numbers.Integral, numbers.Real)):
        raise TypeError(f"keep must be a float in (0, 1] or an int >= 1, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        keep = int(keep)
        if keep < 1:
            raise ValueError(f"keep as a number of directions must be >= 1, got {keep}")
        if keep == 1:
            warnings.warn(
                "keep=1 (an int) keeps a single direction; write keep=1.0 to keep all of them",
                SimilarityWarning,
                stacklevel=stacklevel,
            )
        return keep
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
    return keep


def _decompose_pair(
    x: Tensor | Decomposition, y: Tensor | Decomposition, dtype: torch.dtype, *, standardize: bool = False
) -> tuple[Decomposition, Decomposition, Tensor | None]:
    """Check and decompose both sides; two tensors on the Gram route share one pass over the data.

    Returns the decompositions and, when that pass ran, the cross-Gram ``(Xc Wx)^T (Yc Wy)`` it produced, in
    the decompositions' column scales ``W``. ``standardize`` scales each column to unit norm first (for the
    measures that do not depend on a column's scale), so the rank is decided on scale-free data.
    """
    _check_dtype(dtype)
    if not isinstance(x, Decomposition):
        x = _check_representation(x, "x")
    if not isinstance(y, Decomposition):
        y = _check_representation(y, "y")
    n_x = x.n_datapoints if isinstance(x, Decomposition) else x.shape[0]
    n_y = y.n_datapoints if isinstance(y, Decomposition) else y.shape[0]
    if n_x != n_y:
        raise ValueError(
            f"x and y must have the same number of datapoints (rows), got {n_x} and {n_y}; rows are datapoints,"
            " columns are neurons (transpose google/svcca-style inputs)"
        )
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        _check_pair(x, y)
        if n_x >= max(x.shape[1], y.shape[1]):
            # the three Gram products in one pass over both matrices
            mean_x, mean_y = _mean(x, dtype, "x"), _mean(y, dtype, "y")
            gram_x, gram_y, cross_gram = _block_products(x, mean_x, y, mean_y, own=True)
            reusable = not (_out_of_range(gram_x) or _out_of_range(gram_y))
            dx = _from_gram(x, mean_x, gram_x, "x", torch.finfo(x.dtype).eps, standardize=standardize)
            dy = _from_gram(y, mean_y, gram_y, "y", torch.finfo(y.dtype).eps, standardize=standardize)
            if not reusable:  # a side was rescaled: its cross product is recomputed in the new scale
                return dx, dy, None
            return dx, dy, _scale_columns(cross_gram, dx.column_scale, dy.column_scale)
    dx = x if isinstance(x, Decomposition) else _decompose_checked(x, "x", dtype, standardize=standardize)
    dy = y if isinstance(y, Decomposition) else _decompose_checked(y, "y", dtype, standardize=standardize)
    return dx, dy, None


def _scale_columns(product: Tensor, scale_a: Tensor | None, scale_b: Tensor | None) -> Tensor:
    """``diag(scale_a) P diag(scale_b)`` for ``(1, d)`` scales (``None``: 1)."""
    if scale_a is not None:
        product = scale_a.reshape(-1, 1).to(product.dtype) * product
    if scale_b is not None:
        product = product * scale_b.reshape(1, -1).to(product.dtype)
    return product


def _mean(x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Column means ``(1, d)``, accumulated in ``dtype``.

    They double as the NaN/Inf check (a non-finite entry makes its column's mean non-finite), so valid inputs
    pay no extra pass over the data.
    """
    mean = x.mean(dim=0, keepdim=True, dtype=dtype)
    if not bool(torch.isfinite(mean).all()):
        _raise_if_not_finite(x, name)
    return mean


#: Bytes of rows centred at a time: small enough to stay in cache, large enough for efficient products.
_BLOCK_BYTES = 1 << 22


def _tracks_grad(*tensors: Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then no in-place buffers may be used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _block_products(
    x: Tensor,
    mean_x: Tensor,
    y: Tensor,
    mean_y: Tensor,
    *,
    own: bool = False,
    scale_x: Tensor | None = None,
    scale_y: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Centred products in the means' dtype, one pass over the rows: ``(Xc^T Xc, Yc^T Yc, Xc^T Yc)``.

    With ``own=False`` only the cross product is formed (the first two are empty). Rows are centred a block of a
    few MiB at a time, in reused buffers: centring whole matrices first would allocate (and page in) copies of
    the data, which costs as much as the products themselves when layers are narrow. ``scale_x`` and
    ``scale_y`` (``(1, d)``) multiply the centred columns first. Inputs that require grad are centred whole,
    out of place, so that the products are differentiable.
    """
    dtype, device = mean_x.dtype, x.device
    d1, d2 = x.shape[1], y.shape[1]
    if _tracks_grad(x, y, mean_x, mean_y):
        block_x, block_y = x.to(dtype) - mean_x, y.to(dtype) - mean_y.to(dtype)
        if scale_x is not None:
            block_x = block_x * scale_x
        if scale_y is not None:
            block_y = block_y * scale_y.to(dtype)
        empty = block_x.new_zeros(0, 0)
        return (block_x.T @ block_x if own else empty), (block_y.T @ block_y if own else empty), block_x.T @ block_y
    rows = min(x.shape[0], max(64, _BLOCK_BYTES // (8 * (d1 + d2))))
    gram_x = torch.zeros(d1 if own else 0, d1 if own else 0, dtype=dtype, device=device)
    gram_y = torch.zeros(d2 if own else 0, d2 if own else 0, dtype=dtype, device=device)
    cross = torch.zeros(d1, d2, dtype=dtype, device=device)
    buffer_x = torch.empty(rows, d1, dtype=dtype, device=device)
    buffer_y = torch.empty(rows, d2, dtype=dtype, device=device)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        block_x = torch.sub(x[start:stop], mean_x, out=buffer_x[: stop - start])
        block_y = torch.sub(y[start:stop], mean_y, out=buffer_y[: stop - start])
        if scale_x is not None:
            block_x.mul_(scale_x)
        if scale_y is not None:
            block_y.mul_(scale_y)
        cross.addmm_(block_x.T, block_y)
        if own:
            _add_upper_gram(gram_x, block_x)
            _add_upper_gram(gram_y, block_y)
    if own:
        gram_x, gram_y = _mirror_upper(gram_x), _mirror_upper(gram_y)
    return gram_x, gram_y, cross


#: Column groups of about this width split a Gram product into its upper-triangular blocks.
_GRAM_GROUP = 128


def _add_upper_gram(gram: Tensor, block: Tensor) -> None:
    """Add ``block^T block`` to the upper triangle (and diagonal blocks) of ``gram``, skipping the lower blocks.

    A symmetric product needs only the blocks on and above the diagonal: with column groups of about
    ``_GRAM_GROUP`` this does about ``(1 + 1/g) / 2`` of a full product's work for ``g`` groups (5/8 for 512
    columns), in GEMMs wide enough to stay efficient. torch exposes no ``syrk``. Call :func:`_mirror_upper` once
    at the end.
    """
    d = block.shape[1]
    parts = _gram_groups(d)
    if parts < 2:
        gram.addmm_(block.T, block)
        return
    edges = [round(i * d / parts) for i in range(parts + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        gram[start:stop, start:].addmm_(block[:, start:stop].T, block[:, start:])


def _gram_groups(d: int) -> int:
    return max(1, round(d / _GRAM_GROUP))


def _mirror_upper(gram: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle is ``gram``'s (after :func:`_add_upper_gram`)."""
    if _gram_groups(gram.shape[0]) < 2:
        return gram  # one group: the product was formed whole
    return gram.triu() + gram.triu(1).T


def _gram(x: Tensor, mean: Tensor, scale: Tensor | None = None) -> Tensor:
    """``(Xc W)^T (Xc W)``, centring a block of rows at a time (``W = diag(scale)``, default identity)."""
    dtype, device = mean.dtype, x.device
    if _tracks_grad(x, mean):
        centred = x.to(dtype) - mean
        if scale is not None:
            centred = centred * scale
        return centred.T @ centred
    rows = min(x.shape[0], max(64, _BLOCK_BYTES // (8 * x.shape[1])))
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=device)
    buffer = torch.empty(rows, x.shape[1], dtype=dtype, device=device)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        block = torch.sub(x[start:stop], mean, out=buffer[: stop - start])
        if scale is not None:
            block.mul_(scale)
        _add_upper_gram(gram, block)
    return _mirror_upper(gram)


def _out_of_range(gram: Tensor) -> bool:
    """Whether a Gram matrix overflowed or underflowed its dtype (data beyond about 1e150 or below 1e-150)."""
    trace = float(gram.detach().diagonal().sum())
    finfo = torch.finfo(gram.dtype)
    return not math.isfinite(trace) or trace < finfo.tiny / finfo.eps


def _range_scale(x: Tensor, mean: Tensor, name: str) -> Tensor:
    """A power of two that brings the largest centred entry of ``x`` near 1, as a ``(1, d)`` column scale.

    Raises:
        ZeroVarianceError: every centred entry is 0.
    """
    with torch.no_grad():
        largest = float(max(float((block.to(mean.dtype) - mean).abs().max()) for block in x.split(_ROW_BLOCK)))
    if not largest > 0:
        raise ZeroVarianceError(_zero_variance_message(name))
    finfo = torch.finfo(mean.dtype)
    lowest, highest = math.frexp(finfo.tiny)[1] + 2, math.frexp(finfo.max)[1] - 2
    exponent = max(lowest, min(highest, -math.frexp(largest)[1]))
    return torch.full_like(mean, math.ldexp(1.0, exponent)).detach()


#: Rows converted to the compute dtype at a time outside the product loops.
_ROW_BLOCK = 8192


def _raise_if_not_finite(x: Tensor, name: str) -> None:
    """Raise a ValueError that locates the first NaN or Inf of ``x`` (the slow path of the check)."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        raise ValueError(f"{name} has values so large that their sum overflows {x.dtype}; rescale it first")
    bad = int((~finite).sum())
    row, col = (int(i) for i in (~finite).nonzero()[0])
    raise ValueError(
        f"{name} holds {bad} NaN or Inf value(s), the first at row {row}, column {col}; check the layer for"
        " overflow (e.g. under mixed precision) before comparing"
    )


def _decompose_checked(
    x: Tensor, name: str, dtype: torch.dtype, input_eps: float | None = None, *, standardize: bool = False
) -> Decomposition:
    """Decompose a validated representation: Gram route when n >= d, the n x n kernel otherwise.

    ``input_eps`` is the rounding level of the data (default: its dtype's epsilon); pass the original dtype's
    when ``x`` was upcast from lower precision.
    """
    n, d = x.shape
    input_eps = torch.finfo(x.dtype).eps if input_eps is None else input_eps
    # 1. centre (block by block, inside the products).
    mean = _mean(x, dtype, name)
    if n >= d:
        return _from_gram(x, mean, _gram(x, mean), name, input_eps, standardize=standardize)
    return _from_kernel(x, mean, name, input_eps, standardize=standardize)


def _from_kernel(x: Tensor, mean: Tensor, name: str, input_eps: float, *, standardize: bool) -> Decomposition:
    """Fewer datapoints than features: eigenvectors of the ``n x n`` kernel ``Xc Xc^T = U diag(s^2) U^T``.

    Forming the kernel is a GEMM and its eigenproblem is ``n x n``: several times cheaper than a thin SVD of the
    ``n x d`` data, and its rank cut is the Gram route's. ``V = Xc^T U / s`` follows from ``U``.
    """
    n, d = x.shape
    centred = x.to(mean.dtype) - mean
    column_sq = centred.square().sum(dim=0, keepdim=True)
    scale = None
    if _out_of_range(column_sq.sum().reshape(1, 1)):
        scale = _range_scale(x, mean, name)
        column_sq = (centred * scale).square().sum(dim=0, keepdim=True)
    if standardize:
        scale = _standardizing_scale(column_sq, mean if scale is None else mean * scale, n, input_eps, name, scale)
    if scale is not None:
        centred = centred * scale
    scaled_mean = mean if scale is None else mean * scale
    kernel = centred @ centred.T
    mean_sq = n * float(scaled_mean.detach().square().sum())
    floor = _noise_floor(float(kernel.detach().diagonal().sum()), mean_sq, n, input_eps, mean.dtype)
    singular_values, left = _spectrum_from_gram(*torch.linalg.eigh(kernel))
    keep = _rank_mask(singular_values, floor, n, d, gram=True)
    if not bool(keep.any()):
        raise ZeroVarianceError(_zero_variance_message(name))
    singular_values, left = singular_values[keep], left[:, keep]
    right = centred.T @ left / singular_values
    signs = _sign_of_largest(right)
    return Decomposition(singular_values, right * signs, left * signs, None, None, n, d, scale)


def _from_gram(
    x: Tensor, mean: Tensor, gram: Tensor, name: str, input_eps: float, *, standardize: bool = False
) -> Decomposition:
    """The Gram route: eigenvectors of ``Xc^T Xc = V diag(s^2) V^T``, cut to numerical rank.

    A Gram matrix that overflowed or underflowed is formed again from data scaled by a power of two; with
    ``standardize`` the columns are then scaled to unit norm (``W^T G W``, no pass over the data).
    """
    n, d = x.shape
    scale = None
    if _out_of_range(gram):
        scale = _range_scale(x, mean, name)
        gram = _gram(x, mean, scale)
    if standardize:
        scaled_mean = mean if scale is None else mean * scale
        unit = _standardizing_scale(gram.diagonal().reshape(1, -1), scaled_mean, n, input_eps, name, None)
        gram = unit.reshape(-1, 1) * gram * unit
        scale = unit if scale is None else scale * unit
    scaled_mean = mean if scale is None else mean * scale
    floor = _noise_floor(
        float(gram.detach().diagonal().sum()), n * float(scaled_mean.detach().square().sum()), n, input_eps, gram.dtype
    )
    singular_values, right = _spectrum_from_gram(*torch.linalg.eigh(gram))
    keep = _rank_mask(singular_values, floor, n, d, gram=True)
    if not bool(keep.any()):
        raise ZeroVarianceError(_zero_variance_message(name))
    return Decomposition(singular_values[keep], _fix_signs(right[:, keep]), None, x, mean, n, d, scale)


def _standardizing_scale(
    column_sq: Tensor, mean: Tensor, n: int, input_eps: float, name: str, scale: Tensor | None
) -> Tensor:
    """``1 / ||xc_j||`` for each column above its own noise floor, 0 for the others, times ``scale``.

    ``column_sq`` and ``mean`` are in the units of ``scale`` already (``None``: the data's). A column's floor is
    :func:`_noise_floor` of that column alone: the rounding of its values and of its mean.

    Raises:
        ZeroVarianceError: no column varies above its floor.
    """
    compute_eps = torch.finfo(mean.dtype).eps
    mean_sq = n * mean.square()
    rounding = max(input_eps, compute_eps) * (column_sq + mean_sq).sqrt()
    residue = 4.0 * compute_eps * math.log2(2 * n) * mean_sq.sqrt()
    norms = column_sq.sqrt()
    live = norms > torch.maximum(rounding, residue)
    if not bool(live.any()):
        raise ZeroVarianceError(_zero_variance_message(name))
    unit = torch.where(live, 1.0 / torch.where(live, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    return unit if scale is None else unit * scale


def _spectrum_from_gram(eigenvalues: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values (descending) and right vectors from ``eigh`` of a Gram matrix (ascending)."""
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    return eigenvalues.clamp_min(0.0).sqrt(), vectors


def _noise_floor(centred_sq: float, mean_sq: float, n: int, input_eps: float, dtype: torch.dtype) -> float:
    """Singular value below which a direction of the centred data is rounding error, not signal.

    Args:
        centred_sq: ``||Xc||_F^2``.
        mean_sq: ``n * ||mean||^2``, so that ``||X||_F^2 = centred_sq + mean_sq`` (the raw, uncentred data).
        n: number of datapoints.
        input_eps: rounding level of the data's own dtype.
        dtype: the compute dtype (data are rounded to it too).

    Two sources: 1. rounding each entry (to its dtype, then to the compute dtype) changes it by at most
    ``eps * |x_ij|``, a perturbation of spectral norm at most ``eps * ||X||_F``; 2. the column means carry a
    summation error of about ``eps * log2(n) * |mean_j|``, and subtracting them leaves that residue in every
    row: a rank-one matrix of spectral norm ``sqrt(n) * ||error||``. A constant layer thus has no direction
    above the floor, whatever its values.
    """
    compute_eps = torch.finfo(dtype).eps
    rounding = max(input_eps, compute_eps) * math.sqrt(centred_sq + mean_sq)
    mean_residue = 4.0 * compute_eps * math.log2(2 * n) * math.sqrt(mean_sq)
    return max(rounding, mean_residue)


def _rank_mask(singular_values: Tensor, floor: float, n: int, d: int, *, gram: bool) -> Tensor:
    """Directions above the data's noise floor and above what the decomposition itself resolves.

    The decomposition resolves singular values down to ``eps * max(n, d) * s_max`` (the ``sqrt`` of that on
    the Gram route, which squares them).
    """
    if singular_values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=singular_values.device)
    s_max = float(singular_values.detach().max())
    decomposition_floor = torch.finfo(singular_values.dtype).eps * max(n, d)
    if gram:
        decomposition_floor = math.sqrt(decomposition_floor)
    return singular_values > max(floor, decomposition_floor * s_max)


def _sign_of_largest(vectors: Tensor) -> Tensor:
    """Signs that make the largest-magnitude entry of each column positive (a deterministic SVD sign)."""
    index = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(vectors, 0, index))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _fix_signs(vectors: Tensor) -> Tensor:
    return vectors * _sign_of_largest(vectors)


def _kept_count(singular_values: Tensor, keep: float | int, keep_by: str) -> int:
    """Fewest leading directions whose cumulative sum reaches ``keep`` of the total (or ``keep`` itself)."""
    rank = int(singular_values.shape[0])
    if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        return max(1, min(int(keep), rank))
    weights = singular_values if keep_by == "singular_values" else singular_values.square()
    cumulative = torch.cumsum(weights, dim=0)
    # Round-off can leave the last cumulative sum a hair below the total: keep=1.0 must keep everything.
    target = keep * float(cumulative[-1].detach()) * (1.0 - 4.0 * rank * torch.finfo(weights.dtype).eps)
    return max(1, min(rank, int((cumulative < target).sum()) + 1))


def _cross(
    a: Decomposition,
    b: Decomposition,
    kept_a: int | None = None,
    kept_b: int | None = None,
    *,
    cross_gram: Tensor | None = None,
) -> Tensor:
    """``Ua[:, :kept_a]^T Ub[:, :kept_b]``, by whichever route the two decompositions allow.

    ``cross_gram`` is ``Xa_c^T Xb_c`` when the caller already has it (two tensors decomposed together).
    """
    kept_a = a.rank if kept_a is None else kept_a
    kept_b = b.rank if kept_b is None else kept_b
    dtype = a.singular_values.dtype
    if a.left is not None and b.left is not None:
        return a.left[:, :kept_a].to(dtype).T @ b.left[:, :kept_b].to(dtype)
    if a.left is None and b.left is None:
        # Cross-Gram route: Ua^T Ub = diag(1/sa) Va^T (Xa^T Xb) Vb diag(1/sb), columns in each side's scale.
        whiten_a = a.right[:, :kept_a] / a.singular_values[:kept_a]
        whiten_b = b.right[:, :kept_b] / b.singular_values[:kept_b]
        if cross_gram is None:
            scale_b = None if b.column_scale is None else b.column_scale.to(dtype)
            cross_gram = _block_products(
                a.data, a.mean, b.data, b.mean.to(dtype), scale_x=a.column_scale, scale_y=scale_b
            )[2]
        return whiten_a.T @ cross_gram @ whiten_b.to(dtype)
    if a.left is None:
        whiten_a = a.right[:, :kept_a] / a.singular_values[:kept_a]
        # the mean is orthogonal to b's basis (its columns sum to zero), so a's raw data needs no centring here
        data = a.data.to(dtype) if a.column_scale is None else a.data.to(dtype) * a.column_scale
        return whiten_a.T @ (data.T @ b.left[:, :kept_b].to(dtype))
    return _cross(b, a, kept_b, kept_a).T


def _correlations(cross: Tensor) -> Tensor:
    """Canonical correlations: singular values of the cross product of orthonormal bases, clamped to [0, 1].

    Taken as square roots of the eigenvalues of the smaller of ``M M^T`` and ``M^T M``: about half the cost of
    an SVD, and exact to ``sqrt(eps)`` even for correlations near 0 (ample for a similarity in [0, 1]).
    """
    small = cross @ cross.T if cross.shape[0] <= cross.shape[1] else cross.T @ cross
    return torch.linalg.eigvalsh(small).flip(0).clamp(0.0, 1.0).sqrt()


def _ridge(decomposition: Decomposition, epsilon: float) -> Tensor:
    """Per-direction factor ``sqrt(lambda / (lambda + epsilon))`` of a covariance ridge, ``lambda = s^2/(n-1)``."""
    variances = decomposition.singular_values.square() / (decomposition.n_datapoints - 1)
    return torch.sqrt(variances / (variances + epsilon))


def _pwcca_from_cross(dx: Decomposition, cross: Tensor) -> Tensor:
    """PWCCA from ``x``'s decomposition and ``Ux^T Uy`` (both at full rank)."""
    if dx.right is None:
        raise ValueError("pwcca needs the right singular vectors of x; decompose it with the vectors kept")
    # 1. canonical directions: cross = A diag(rho) B^T; the variates of x are H = Ux A (orthonormal).
    #    A and rho^2 are the leading eigenvectors and eigenvalues of cross cross^T (an eigenproblem is several
    #    times faster than an SVD with vectors on the CPU; rho is exact to sqrt(eps), ample for a weighted mean).
    count = min(cross.shape)
    eigenvalues, eigenvectors = torch.linalg.eigh(cross @ cross.T)
    a_vectors = eigenvectors[:, -count:].flip(1)
    rho = eigenvalues[-count:].flip(0).clamp(0.0, 1.0).sqrt()
    # 2. <h_i, x_j> = (A^T Ux^T Xc)_ij = (A^T diag(s) V^T)_ij; alpha_i sums their magnitudes over neurons j.
    #    A decomposition of Xc W (scaled columns) gives (A^T diag(s) V^T W^-1); constant columns (w = 0) give 0.
    projections = a_vectors.T @ (dx.singular_values[:, None] * dx.right.to(cross.dtype).T)
    if dx.column_scale is not None:
        scale = dx.column_scale.to(cross.dtype)
        projections = projections * torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)
    alpha = projections.abs().sum(dim=1)
    # 3. weighted mean of the correlations.
    return ((alpha * rho).sum() / alpha.sum()).clamp(0.0, 1.0)


def _cka_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
    """Linear CKA from the spectra and ``Ux^T Uy``: ``||Sx M Sy||_F^2 / (||Sx^2|| ||Sy^2||)``."""
    sx = dx.singular_values
    sy = dy.singular_values.to(sx.dtype)
    numerator = (sx[:, None] * cross * sy[None, :]).square().sum()
    return (numerator / (sx.square().norm() * sy.square().norm())).clamp(0.0, 1.0)


def _warn_if_few_datapoints(n: int, kept: int, measure: str, *, stacklevel: int) -> None:
    recommended = DATAPOINTS_PER_DIRECTION * kept
    if n < recommended:
        warnings.warn(
            f"{measure} compares {kept} directions using only {n} datapoints; CCA is biased towards 1 with too few."
            f" Use at least {recommended} datapoints ({DATAPOINTS_PER_DIRECTION} per kept direction), e.g. a larger"
            " probe, more positions per sample, or fewer kept directions",
            TooFewDatapointsWarning,
            stacklevel=stacklevel,
        )


def _zero_variance_message(name: str) -> str:
    return (
        f"{name} has zero variance: every datapoint has the same activations (a dead or constant layer), or they"
        " differ only at the rounding level of their dtype (e.g. small variations on a large offset in float32:"
        " subtract the offset before casting, or pass float64), so there is nothing to correlate"
    )
