"""What the sample-level measures share: input checks, per-sample similarity from a Gram matrix, unbiased HSIC.

Mutual k-NN, CKNNA, RSA and minibatch CKA compare how a representation relates its *datapoints* to each other
(``n x n`` matrices), not its directions. They are computed from Gram matrices ``G = Z Z^T`` of rows ``Z``, so
that the training-time snapshots (which hold the rows only up to a rotation of the features) give the same value
as the raw activations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_svcca.measures._checks import (
    ZeroVarianceError,
    check_dtype,
    check_pair,
    check_representation,
    raise_if_not_finite,
    zero_variance_message,
)
from lightning_svcca.measures._linalg import column_mean, noise_floor


def checked_pair(x: object, y: object, dtype: torch.dtype, min_datapoints: int) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` as finite, varying 2-D tensors of the same datapoints, in ``dtype``, or raise.

    Raises:
        ValueError: bad shapes, NaN or Inf, fewer than ``min_datapoints`` rows.
        ZeroVarianceError: a side has no variance (every datapoint the same).
    """
    check_dtype(dtype)
    x = check_representation(x, "x")
    y = check_representation(y, "y")
    check_pair(x, y)
    if x.shape[0] < min_datapoints:
        raise ValueError(f"this measure needs at least {min_datapoints} datapoints (rows), got {x.shape[0]}")
    for name, data in (("x", x), ("y", y)):
        check_varies(data, name, dtype)
    return x.to(dtype), y.to(dtype)


def check_varies(x: Tensor, name: str, dtype: torch.dtype) -> None:
    """Raise :class:`ZeroVarianceError` when the centred ``x`` is below its rounding level (NaN/Inf: ValueError)."""
    mean = column_mean(x, dtype, name)
    centred_sq = float((x.to(dtype) - mean).square().sum())
    n = x.shape[0]
    floor = noise_floor(centred_sq, n * float(mean.square().sum()), n, torch.finfo(x.dtype).eps, dtype)
    if centred_sq**0.5 <= floor:
        raise ZeroVarianceError(zero_variance_message(name))


def check_finite(x: Tensor, name: str) -> None:
    """Raise a ValueError locating the first NaN or Inf of ``x``."""
    if not bool(torch.isfinite(x).all()):
        raise_if_not_finite(x, name)


def cosine_from_gram(gram: Tensor) -> Tensor:
    """Cosine similarities ``G_ij / sqrt(G_ii G_jj)``, in place; a zero row is similar to nothing (0).

    The zero-row convention is ``torch.nn.functional.normalize``'s.
    """
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    return gram.mul_(inverse[:, None]).mul_(inverse[None, :])


def unit_rows(x: Tensor) -> Tensor:
    """``x`` with each row scaled to unit length (a zero row stays zero), so ``X X^T`` holds cosines."""
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, 1.0)


def sparse_unbiased_hsic(keys_a: Tensor, values_a: Tensor, keys_b: Tensor, values_b: Tensor, n: int) -> Tensor:
    r"""Unbiased HSIC (Song et al. 2012) of two ``n x n`` matrices with zero diagonals, given by their nonzero entries.

    ``keys`` are sorted flat indices ``i * n + j`` (``i != j``) and ``values`` the entries there; the matrices need
    not be symmetric (``tr(A B) = sum A_ij B_ji`` reads ``B`` at each transposed key of ``A``). ``O(m log m)`` for
    ``m`` entries: CKNNA's k-NN-masked kernels have ``n k``, against the ``n^3`` of forming ``A B``.
    """
    if keys_a.numel() == 0 or keys_b.numel() == 0:
        return values_a.new_zeros(())
    rows_a, cols_a = keys_a // n, keys_a % n
    # tr(A B) = sum_ij A_ij B_ji: each entry of A with B's entry at the transposed position, where B has one
    transposed = cols_a * n + rows_a
    where = torch.searchsorted(keys_b, transposed).clamp_max(keys_b.numel() - 1)
    trace = (values_a * torch.where(keys_b[where] == transposed, values_b[where], 0.0)).sum()
    # 1^T A B 1 = sum_l (column sums of A)_l (row sums of B)_l
    column_sums_a = values_a.new_zeros(n).index_add_(0, cols_a, values_a)
    row_sums_b = values_b.new_zeros(n).index_add_(0, keys_b // n, values_b)
    sums = values_a.sum() * values_b.sum() / ((n - 1) * (n - 2))
    return (trace + sums - 2.0 * torch.dot(column_sums_a, row_sums_b) / (n - 2)) / (n * (n - 3))
