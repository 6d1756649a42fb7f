"""Minibatch CKA (Nguyen, Raghu and Kornblith 2021): unbiased linear HSIC averaged over chunks of datapoints.

For layers compared over more datapoints than fit in memory at once: each chunk of ``b`` datapoints contributes
its unbiased HSIC estimates (Song et al. 2012), and CKA is formed from their means. :class:`MinibatchCKA`
accumulates chunk by chunk (``update`` / ``compute``, as a torchmetrics metric); :func:`minibatch_cka` runs it
over the rows of two tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_svcca.measures._checks import (
    ZeroVarianceError,
    check_dtype,
    check_pair,
    check_representation,
    zero_variance_message,
)
from lightning_svcca.measures._linalg import column_mean, noise_floor
from lightning_svcca.measures._samples import hsic_from_parts, hsic_parts

__all__ = ["MIN_CHUNK", "MinibatchCKA", "minibatch_cka"]

#: The unbiased HSIC estimator needs at least this many datapoints per chunk.
MIN_CHUNK = 4


class MinibatchCKA:
    r"""Streaming minibatch CKA: call :meth:`update` with each chunk's activations, then :meth:`compute`.

    .. math::
        \mathrm{CKA}_{mb} = \frac{\frac1C \sum_c \mathrm{HSIC}_1(K_c, L_c)}
            {\sqrt{\frac1C \sum_c \mathrm{HSIC}_1(K_c, K_c) \cdot \frac1C \sum_c \mathrm{HSIC}_1(L_c, L_c)}}

    with ``K_c = X_c X_c^T``, ``L_c = Y_c Y_c^T`` the linear kernels of chunk ``c`` and :math:`\mathrm{HSIC}_1`
    the unbiased estimator. Unbiased HSIC is translation-invariant, so each chunk is centred first (exactly the
    same value, less rounding). It is an inner product of U-centred kernels (Szekely and Rizzo 2014), so the
    value lies in ``[-1, 1]`` (Cauchy-Schwarz, over chunks too) and the normalisers are never negative: the
    value is never NaN. With one chunk holding every datapoint it is ``linear_cka(x, y, debiased=True)``.
    Memory: one chunk's two ``b x b`` kernels.

    Args:
        dtype: precision of the kernels and sums.

    Example:
        >>> x = torch.randn(1000, 16, dtype=torch.float64)
        >>> metric = MinibatchCKA()
        >>> for rows in x.split(250):
        ...     metric.update(rows, 2.0 * rows)
        >>> round(float(metric.compute()), 6)
        1.0
    """

    def __init__(self, *, dtype: torch.dtype = torch.float64) -> None:
        check_dtype(dtype)
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        """Forget every chunk."""
        self.chunks = 0
        self._sums = torch.zeros(3, dtype=self.dtype)  # HSIC(K, L), HSIC(K, K), HSIC(L, L)
        self._varies = [False, False]

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one chunk: ``(b, d1)`` and ``(b, d2)`` activations of the same ``b >= 4`` datapoints.

        Raises:
            ValueError: bad shapes, NaN or Inf, fewer than 4 rows.
        """
        x = check_representation(x, "x")
        y = check_representation(y, "y")
        check_pair(x, y)
        if x.shape[0] < MIN_CHUNK:
            raise ValueError(
                f"a chunk needs at least {MIN_CHUNK} datapoints for the unbiased HSIC estimator, got {x.shape[0]};"
                " merge it with the previous chunk"
            )
        kernels = [self._kernel(data, name, side) for side, (name, data) in enumerate((("x", x), ("y", y)))]
        kernel_x, kernel_y = kernels
        parts_x, parts_y = hsic_parts(kernel_x), hsic_parts(kernel_y)
        chunk = torch.stack(
            [
                hsic_from_parts(kernel_x, kernel_y, parts_x, parts_y),
                hsic_from_parts(kernel_x, kernel_x, parts_x, parts_x),
                hsic_from_parts(kernel_y, kernel_y, parts_y, parts_y),
            ]
        )
        self._sums = self._sums.to(chunk.device) + chunk
        self.chunks += 1

    def compute(self) -> Tensor:
        """Minibatch CKA of the chunks seen so far (0-dim tensor in ``[-1, 1]``).

        Raises:
            ValueError: no chunk yet.
            ZeroVarianceError: a side did not vary within any chunk.
        """
        if self.chunks == 0:
            raise ValueError("MinibatchCKA.compute() before any update(): nothing to compare")
        for side, name in enumerate(("x", "y")):
            if not self._varies[side]:
                raise ZeroVarianceError(zero_variance_message(name) + " (within every chunk)")
        cross, own_x, own_y = self._sums / self.chunks
        denominator = (own_x * own_y).clamp_min(0.0).sqrt()
        if not float(denominator) > 0:
            return cross.new_zeros(())  # U-centred kernels all zero (e.g. chunks of 4 on a line): no dependence seen
        return (cross / denominator).clamp(-1.0, 1.0)

    def _kernel(self, data: Tensor, name: str, side: int) -> Tensor:
        """The chunk's linear kernel of its centred rows; zero when they do not vary above their rounding level."""
        mean = column_mean(data, self.dtype, name)
        centred = data.to(self.dtype) - mean
        kernel = centred @ centred.T
        centred_sq = float(kernel.diagonal().sum())  # ||Xc||_F^2
        n = data.shape[0]
        floor = noise_floor(centred_sq, n * float(mean.square().sum()), n, torch.finfo(data.dtype).eps, self.dtype)
        if centred_sq**0.5 > floor:
            self._varies[side] = True
            return kernel
        return kernel.zero_()


def minibatch_cka(x: Tensor, y: Tensor, batch_size: int = 256, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Minibatch linear CKA over consecutive chunks of ``batch_size`` rows (see :class:`MinibatchCKA`).

    A last chunk shorter than 4 rows joins the one before it. ``batch_size >= n`` gives the full unbiased CKA,
    ``linear_cka(x, y, debiased=True)``. Rows are taken in order: shuffle them first if they are sorted (e.g. by
    class), as a chunk's HSIC only sees pairs inside it.

    Args:
        x: ``(n, d1)`` representation, ``n >= 4``.
        y: ``(n, d2)`` representation of the same datapoints.
        batch_size: datapoints per chunk, ``>= 4``.
        dtype: precision of the kernels and sums.

    Returns:
        0-dim tensor in ``[-1, 1]``: near 0 for unrelated data, 1 for equal data up to rotation and scale.

    Raises:
        ValueError: bad shapes, NaN or Inf, ``n < 4`` or ``batch_size < 4``.
        ZeroVarianceError: a side does not vary within any chunk.

    Example:
        >>> x = torch.randn(300, 5, dtype=torch.float64)
        >>> round(float(minibatch_cka(x, x + 1.0, batch_size=64)), 6)
        1.0
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < MIN_CHUNK:
        raise ValueError(f"batch_size must be an int >= {MIN_CHUNK} (datapoints per chunk), got {batch_size!r}")
    x = check_representation(x, "x")
    y = check_representation(y, "y")
    check_pair(x, y)
    n = x.shape[0]
    if n < MIN_CHUNK:
        raise ValueError(f"minibatch_cka needs at least {MIN_CHUNK} datapoints, got {n}")
    metric = MinibatchCKA(dtype=dtype)
    for start, stop in chunk_bounds(n, batch_size):
        metric.update(x[start:stop], y[start:stop])
    return metric.compute()


def chunk_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``batch_size`` rows; a last one under 4 rows joins the previous."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_CHUNK:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds
