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
    """Cosine similarities ``G_ij / sqrt(G_ii G_jj)``; a zero row is similar to nothing (0), as ``F.normalize``."""
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    return gram * inverse[:, None] * inverse[None, :]


def unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (the papers' symbol)
    r"""The unbiased HSIC estimator of Song et al. (2012, eq. 5), for square ``n x n`` matrices, ``n >= 4``.

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)} \Big[ \mathrm{tr}(\tilde K \tilde L)
            + \frac{\mathbf 1^\top \tilde K \mathbf 1 \; \mathbf 1^\top \tilde L \mathbf 1}{(n-1)(n-2)}
            - \frac{2}{n-2} \mathbf 1^\top \tilde K \tilde L \mathbf 1 \Big]

    with ``K~``, ``L~`` the matrices with their diagonals zeroed. ``1^T K~ L~ 1`` is taken as the product of
    column and row sums (``O(n^2)``), not through ``K~ L~`` (``O(n^3)``). ``K`` need not be symmetric.
    """
    n = k.shape[0]
    k = k - torch.diag_embed(k.diagonal())
    l = l - torch.diag_embed(l.diagonal())  # noqa: E741
    trace = (k * l.T).sum()
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = (k.sum(dim=0) * l.sum(dim=1)).sum()
    return (trace + sums - 2.0 * cross / (n - 2)) / (n * (n - 3))
