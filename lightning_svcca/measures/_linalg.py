"""The numerical pieces the decompositions share: centred products, noise floors, rank cuts and signs.

Everything here is plain torch on ``(n_datapoints, n_features)`` matrices. The Gram products centre a block of
rows at a time and accumulate in the compute dtype; :func:`basis_from_gram` turns a centred Gram matrix (of one
process's data, or summed over the shards of several) into the rank-cut, sign-fixed basis that both
:func:`~lightning_svcca.measures.decompose` and the training-time snapshots use.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from lightning_svcca.measures._checks import ZeroVarianceError, raise_if_not_finite, zero_variance_message

#: Rows converted to the compute dtype at a time outside the product loops.
ROW_BLOCK = 8192


def column_mean(x: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """Column means ``(1, d)``, accumulated in ``dtype``.

    They double as the NaN/Inf check (a non-finite entry makes its column's mean non-finite), so valid inputs
    pay no extra pass over the data.
    """
    mean = x.mean(dim=0, keepdim=True, dtype=dtype)
    if not bool(torch.isfinite(mean).all()):
        raise_if_not_finite(x, name)
    return mean


#: Bytes of rows centred at a time: small enough to stay in cache, large enough for efficient products.
_BLOCK_BYTES = 1 << 22


def _tracks_grad(*tensors: Tensor) -> bool:
    """Whether autograd records operations on any of ``tensors`` (then no in-place buffers may be used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def block_products(
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


def centred_gram(x: Tensor, mean: Tensor, scale: Tensor | None = None) -> Tensor:
    """``(Xc W)^T (Xc W)``, centring a block of rows at a time (``W = diag(scale)``, default identity)."""
    dtype, device = mean.dtype, x.device
    if _tracks_grad(x, mean):
        centred = x.to(dtype) - mean
        if scale is not None:
            centred = centred * scale
        return centred.T @ centred
    rows = max(1, min(x.shape[0], max(64, _BLOCK_BYTES // (8 * x.shape[1]))))  # a shard may hold no rows
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=device)
    buffer = torch.empty(rows, x.shape[1], dtype=dtype, device=device)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        block = torch.sub(x[start:stop], mean, out=buffer[: stop - start])
        if scale is not None:
            block.mul_(scale)
        _add_upper_gram(gram, block)
    return _mirror_upper(gram)


def upper_gram(centred: Tensor) -> Tensor:
    """``Xc^T Xc`` of rows centred already (in the compute dtype), from its upper blocks as :func:`centred_gram`.

    For a caller that needs the centred rows again (the snapshot builder projects them on the basis next).
    """
    if _gram_groups(centred.shape[1]) < 2:
        return centred.T @ centred  # one column group: the whole product, no zeroed buffer to add into
    gram = centred.new_zeros(centred.shape[1], centred.shape[1])
    _add_upper_gram(gram, centred)
    return _mirror_upper(gram)


def scale_columns(product: Tensor, scale_a: Tensor | None, scale_b: Tensor | None) -> Tensor:
    """``diag(scale_a) P diag(scale_b)`` for ``(1, d)`` scales (``None``: 1)."""
    if scale_a is not None:
        product = scale_a.reshape(-1, 1).to(product.dtype) * product
    if scale_b is not None:
        product = product * scale_b.reshape(1, -1).to(product.dtype)
    return product


def out_of_range(gram: Tensor) -> bool:
    """Whether a Gram matrix overflowed or underflowed its dtype (data beyond about 1e150 or below 1e-150)."""
    trace = float(gram.detach().diagonal().sum())
    finfo = torch.finfo(gram.dtype)
    return not math.isfinite(trace) or trace < finfo.tiny / finfo.eps


def range_scale(x: Tensor, mean: Tensor, name: str) -> Tensor:
    """A power of two that brings the largest centred entry of ``x`` near 1, as a ``(1, d)`` column scale.

    Raises:
        ZeroVarianceError: every centred entry is 0.
    """
    with torch.no_grad():
        largest = float(max(float((block.to(mean.dtype) - mean).abs().max()) for block in x.split(ROW_BLOCK)))
    if not largest > 0:
        raise ZeroVarianceError(zero_variance_message(name))
    finfo = torch.finfo(mean.dtype)
    lowest, highest = math.frexp(finfo.tiny)[1] + 2, math.frexp(finfo.max)[1] - 2
    exponent = max(lowest, min(highest, -math.frexp(largest)[1]))
    return torch.full_like(mean, math.ldexp(1.0, exponent)).detach()


def standardizing_scale(
    column_sq: Tensor, mean: Tensor, n: int, input_eps: float, name: str, scale: Tensor | None
) -> Tensor:
    """``1 / ||xc_j||`` for each column above its own noise floor, 0 for the others, times ``scale``.

    ``column_sq`` and ``mean`` are in the units of ``scale`` already (``None``: the data's). A column's floor is
    :func:`noise_floor` of that column alone: the rounding of its values and of its mean.

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
        raise ZeroVarianceError(zero_variance_message(name))
    unit = torch.where(live, 1.0 / torch.where(live, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    return unit if scale is None else unit * scale


def truncated_spectrum(
    gram: Tensor, mean: Tensor, n: int, d: int, input_eps: float, name: str
) -> tuple[Tensor, Tensor]:
    """Singular values and vectors of centred data from its Gram (or kernel) matrix, cut to numerical rank.

    Args:
        gram: ``Xc^T Xc`` (``(d, d)``, giving ``V``) or the kernel ``Xc Xc^T`` (``(n, n)``, giving ``U``) of the
            centred data, in the units of any column scale already applied.
        mean: the column means, in those units (they set the noise floor of the centring).
        n: number of datapoints.
        d: number of features.
        input_eps: rounding level of the data's own dtype.
        name: the representation, for messages.

    Returns:
        ``(s, vectors)``: the singular values above the noise floor, descending, and their eigenvectors of ``gram``
        (signs as ``eigh`` gave them).

    Raises:
        ZeroVarianceError: no direction is above the floor.
    """
    flat_mean = mean.detach().reshape(-1)
    floor = noise_floor(float(gram.detach().trace()), n * float(flat_mean @ flat_mean), n, input_eps, gram.dtype)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    # eigh sorts ascending: descending singular values s = sqrt(lambda); those above the floor are a leading run,
    # whose columns of vectors are the last ones, flipped (one copy of the kept columns only).
    singular_values = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    kept = _rank(singular_values, floor, n, d)
    if kept == 0:
        raise ZeroVarianceError(zero_variance_message(name))
    return singular_values[:kept], vectors[:, vectors.shape[1] - kept :].flip(1)


def basis_from_gram(gram: Tensor, mean: Tensor, n: int, input_eps: float, name: str) -> tuple[Tensor, Tensor]:
    """The Gram route's decomposition: ``Xc^T Xc = V diag(s^2) V^T``, cut to numerical rank, signs fixed.

    The one copy of this step: :func:`~lightning_svcca.measures.decompose` calls it on one process's Gram matrix,
    the snapshot builder on the Gram matrix and means summed over every process's rows.

    Args:
        gram: ``(d, d)`` centred Gram matrix ``Xc^T Xc`` of all ``n`` datapoints (column-scaled if the data were).
        mean: the column means of all datapoints, in the same units.
        n: number of datapoints.
        input_eps: rounding level of the data's own dtype.
        name: the representation, for messages.

    Returns:
        ``(s, V)``: singular values, descending, and right singular vectors with their largest entry positive.

    Raises:
        ZeroVarianceError: the data have no variance above their rounding level.
    """
    singular_values, right = truncated_spectrum(gram, mean, n, gram.shape[0], input_eps, name)
    return singular_values, fix_signs(right)


def noise_floor(centred_sq: float, mean_sq: float, n: int, input_eps: float, dtype: torch.dtype) -> float:
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


def _rank(singular_values: Tensor, floor: float, n: int, d: int) -> int:
    """How many of the descending singular values (from a Gram route) are above the noise and resolution floors.

    The data's noise ``floor``, and what the decomposition itself resolves: singular values down to
    ``sqrt(eps * max(n, d)) * s_max`` on the Gram route, which squares them.
    """
    if singular_values.numel() == 0:
        return 0
    s_max = float(singular_values[0].detach())
    resolution = math.sqrt(torch.finfo(singular_values.dtype).eps * max(n, d)) * s_max
    return int((singular_values.detach() > max(floor, resolution)).sum())


def sign_of_largest(vectors: Tensor) -> Tensor:
    """Signs that make the largest-magnitude entry of each column positive (a deterministic SVD sign)."""
    largest = torch.gather(vectors, 0, vectors.abs().argmax(dim=0, keepdim=True))
    return torch.where(largest < 0, -1.0, 1.0)  # the default dtype: a product with vectors takes theirs


def fix_signs(vectors: Tensor) -> Tensor:
    """``vectors`` with each column's sign flipped so that its largest-magnitude entry is positive."""
    return vectors * sign_of_largest(vectors)


def kept_count(singular_values: Tensor, keep: float | int, keep_by: str) -> int:
    """Fewest leading directions whose cumulative sum reaches ``keep`` of the total (or ``keep`` itself)."""
    rank = int(singular_values.shape[0])
    if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        return max(1, min(int(keep), rank))
    weights = singular_values if keep_by == "singular_values" else singular_values.square()
    cumulative = torch.cumsum(weights, dim=0)
    # Round-off can leave the last cumulative sum a hair below the total: keep=1.0 must keep everything.
    target = keep * float(cumulative[-1].detach()) * (1.0 - 4.0 * rank * torch.finfo(weights.dtype).eps)
    return max(1, min(rank, int((cumulative < target).sum()) + 1))
