"""Decompositions: the thin SVD of a centred representation, cut to its numerical rank, that every measure uses.

Every measure is a function of three things: the singular values ``s`` and right singular vectors ``V`` of each
centred side, and the cross product ``M = Ux^T Uy`` of the two sides' orthonormal bases. :class:`Decomposition`
holds the first two; pass one in place of a tensor to compare one side against many others without
decomposing it again. :func:`cross_product` forms ``M`` by whichever route two decompositions allow.

When ``n_datapoints >= n_features`` a side is decomposed through its Gram matrix ``Xc^T Xc`` (a GEMM and a
small symmetric eigenproblem), and ``M`` comes from the cross-Gram ``Xc^T Yc``: the cost of a comparison is
about the three Gram products (the two own ones formed by their upper blocks only). With fewer datapoints than
features the ``n x n`` kernel ``Xc Xc^T`` takes the Gram matrix's place.

Everything is plain torch (no Lightning): it runs on the inputs' device, decomposes and accumulates in float64
unless ``dtype=torch.float32`` is asked for. float32 is fast on GPUs but the Gram route squares singular values,
so it only resolves directions down to about ``sqrt(eps * n)`` (1% at n = 5000) of the largest: fine for linear
CKA and for well-conditioned layers, not for CCA of a layer whose spectrum spans several decades (it would drop
directions that float64 keeps).

Numerical hygiene: ranks are cut at the data's rounding level; the CCA family decides ranks on unit-norm columns
(it does not depend on a neuron's scale); data whose squares overflow or underflow are rescaled by a power of
two; inputs that require grad give differentiable values (checked with ``torch.autograd.gradcheck``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_svcca.measures._checks import (
    KeepBy,
    check_dtype,
    check_pair,
    check_representation,
)
from lightning_svcca.measures._linalg import (
    basis_from_gram,
    block_products,
    centred_gram,
    column_mean,
    kept_count,
    out_of_range,
    range_scale,
    scale_columns,
    sign_of_largest,
    standardizing_scale,
    truncated_spectrum,
)

__all__ = ["Decomposition", "decompose"]


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
        """Number of leading directions SVCCA keeps for ``keep`` (see :func:`~lightning_svcca.measures.cca.svcca`)."""
        return kept_count(self.singular_values, keep, keep_by)


def decompose(
    x: Tensor | Decomposition, *, dtype: torch.dtype = torch.float64, standardize: bool = False
) -> Decomposition:
    """Centre ``x`` and compute its thin SVD, cut to numerical rank, for reuse across comparisons.

    Args:
        x: ``(n_datapoints, n_features)`` representation; a :class:`Decomposition` is returned as it is.
        dtype: precision of the decomposition, ``torch.float64`` (default) or ``torch.float32``.
        standardize: decompose the columns scaled to unit norm (see :attr:`Decomposition.column_scale`). The
            measures invariant to a column's scale (``cca``, ``pwcca``, ``r2cca``) do this themselves when given
            tensors; pass ``True`` to reuse one such decomposition with them. SVCCA, CKA and Procrustes need the
            unscaled one.

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
        >>> from lightning_svcca.measures import svcca
        >>> bool(svcca(d, x @ torch.randn(8, 8, dtype=torch.float64), keep=1.0) > 0.999)
        True
    """
    if isinstance(x, Decomposition):
        return x
    check_dtype(dtype)
    x = check_representation(x, "x")
    return decompose_checked(x, "x", dtype, standardize=standardize)


def decompose_checked(
    x: Tensor, name: str, dtype: torch.dtype, input_eps: float | None = None, *, standardize: bool = False
) -> Decomposition:
    """Decompose a validated representation: Gram route when n >= d, the n x n kernel otherwise.

    ``input_eps`` is the rounding level of the data (default: its dtype's epsilon); pass the original dtype's
    when ``x`` was upcast from lower precision.
    """
    n, d = x.shape
    input_eps = torch.finfo(x.dtype).eps if input_eps is None else input_eps
    # 1. centre (block by block, inside the products).
    mean = column_mean(x, dtype, name)
    if n >= d:
        return _from_gram(x, mean, centred_gram(x, mean), name, input_eps, standardize=standardize)
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
    if out_of_range(column_sq.sum().reshape(1, 1)):
        scale = range_scale(x, mean, name)
        column_sq = (centred * scale).square().sum(dim=0, keepdim=True)
    if standardize:
        scale = standardizing_scale(column_sq, mean if scale is None else mean * scale, n, input_eps, name, scale)
    if scale is not None:
        centred = centred * scale
    scaled_mean = mean if scale is None else mean * scale
    singular_values, left = truncated_spectrum(centred @ centred.T, scaled_mean, n, d, input_eps, name)
    right = centred.T @ left / singular_values
    signs = sign_of_largest(right)
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
    if out_of_range(gram):
        scale = range_scale(x, mean, name)
        gram = centred_gram(x, mean, scale)
    if standardize:
        scaled_mean = mean if scale is None else mean * scale
        unit = standardizing_scale(gram.diagonal().reshape(1, -1), scaled_mean, n, input_eps, name, None)
        gram = unit.reshape(-1, 1) * gram * unit
        scale = unit if scale is None else scale * unit
    scaled_mean = mean if scale is None else mean * scale
    singular_values, right = basis_from_gram(gram, scaled_mean, n, input_eps, name)
    return Decomposition(singular_values, right, None, x, mean, n, d, scale)


def decompose_pair(
    x: Tensor | Decomposition, y: Tensor | Decomposition, dtype: torch.dtype, *, standardize: bool = False
) -> tuple[Decomposition, Decomposition, Tensor | None]:
    """Check and decompose both sides; two tensors on the Gram route share one pass over the data.

    Returns the decompositions and, when that pass ran, the cross-Gram ``(Xc Wx)^T (Yc Wy)`` it produced, in
    the decompositions' column scales ``W``. ``standardize`` scales each column to unit norm first (for the
    measures that do not depend on a column's scale), so the rank is decided on scale-free data.
    """
    check_dtype(dtype)
    if not isinstance(x, Decomposition):
        x = check_representation(x, "x")
    if not isinstance(y, Decomposition):
        y = check_representation(y, "y")
    n_x = x.n_datapoints if isinstance(x, Decomposition) else x.shape[0]
    n_y = y.n_datapoints if isinstance(y, Decomposition) else y.shape[0]
    if n_x != n_y:
        raise ValueError(
            f"x and y must have the same number of datapoints (rows), got {n_x} and {n_y}; rows are datapoints,"
            " columns are neurons (transpose google/svcca-style inputs)"
        )
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        check_pair(x, y)
        if n_x >= max(x.shape[1], y.shape[1]):
            # the three Gram products in one pass over both matrices
            mean_x, mean_y = column_mean(x, dtype, "x"), column_mean(y, dtype, "y")
            gram_x, gram_y, cross_gram = block_products(x, mean_x, y, mean_y, own=True)
            reusable = not (out_of_range(gram_x) or out_of_range(gram_y))
            dx = _from_gram(x, mean_x, gram_x, "x", torch.finfo(x.dtype).eps, standardize=standardize)
            dy = _from_gram(y, mean_y, gram_y, "y", torch.finfo(y.dtype).eps, standardize=standardize)
            if not reusable:  # a side was rescaled: its cross product is recomputed in the new scale
                return dx, dy, None
            return dx, dy, scale_columns(cross_gram, dx.column_scale, dy.column_scale)
    dx = x if isinstance(x, Decomposition) else decompose_checked(x, "x", dtype, standardize=standardize)
    dy = y if isinstance(y, Decomposition) else decompose_checked(y, "y", dtype, standardize=standardize)
    return dx, dy, None


def cross_product(
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
            cross_gram = block_products(
                a.data, a.mean, b.data, b.mean.to(dtype), scale_x=a.column_scale, scale_y=scale_b
            )[2]
        return whiten_a.T @ cross_gram @ whiten_b.to(dtype)
    if a.left is None:
        whiten_a = a.right[:, :kept_a] / a.singular_values[:kept_a]
        # the mean is orthogonal to b's basis (its columns sum to zero), so a's raw data needs no centring here
        data = a.data.to(dtype) if a.column_scale is None else a.data.to(dtype) * a.column_scale
        return whiten_a.T @ (data.T @ b.left[:, :kept_b].to(dtype))
    return cross_product(b, a, kept_b, kept_a).T
