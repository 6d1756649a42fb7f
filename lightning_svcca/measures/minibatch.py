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
        self.add_rows(x, y, x.shape[0])

    def add_rows(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        """Add consecutive chunks of ``batch_size`` rows of checked ``x`` and ``y`` (:func:`chunk_bounds`).

        Each chunk costs its centring (into one reused buffer per side), its two kernel products and their three
        inner products (:func:`_chunk_statistics`); the estimates and the noise-floor checks run once for all.
        """
        x, y = x.detach(), y.detach()  # a similarity, not a loss: writing into buffers refuses autograd's tensors
        bounds = chunk_bounds(x.shape[0], batch_size)
        sizes = [stop - start for start, stop in bounds]
        means_x, means_y = _chunk_means(x, sizes, self.dtype), _chunk_means(y, sizes, self.dtype)
        buffer_x = torch.empty(max(sizes), x.shape[1], dtype=self.dtype, device=x.device)
        buffer_y = torch.empty(max(sizes), y.shape[1], dtype=self.dtype, device=y.device)
        statistics = torch.stack(
            [
                _chunk_statistics(
                    torch.sub(x[start:stop], mean_x, out=buffer_x[: stop - start]),
                    mean_x,
                    torch.sub(y[start:stop], mean_y, out=buffer_y[: stop - start]),
                    mean_y,
                )
                for (start, stop), mean_x, mean_y in zip(bounds, means_x, means_y, strict=True)
            ]
        )
        if not bool(torch.isfinite(statistics).all()):
            column_mean(x, self.dtype, "x"), column_mean(y, self.dtype, "y")  # raises, locating NaN or Inf
        self._add(statistics, sizes, _rounding(x, y))

    def _add(self, statistics: Tensor, sizes: list[int], eps: tuple[float, float]) -> None:
        """Add chunks given by their :func:`_chunk_statistics` and sizes (``eps``: each side's rounding level)."""
        varies = [  # each side of each chunk above its rounding level: ||Xc||_F over the noise floor
            [
                row[6 + side] ** 0.5 > noise_floor(row[6 + side], n * row[8 + side], n, eps[side], self.dtype)
                for side in (0, 1)
            ]
            for row, n in zip(statistics.tolist(), sizes, strict=True)
        ]
        self._varies = [self._varies[side] or any(chunk[side] for chunk in varies) for side in (0, 1)]
        mask = statistics.new_tensor(varies)  # a side that does not vary has a zero kernel: its HSICs are 0
        weights = torch.stack([mask[:, 0] * mask[:, 1], mask[:, 0], mask[:, 1]], dim=1)
        hsics = _unbiased_hsics(statistics, statistics.new_tensor(sizes)) * weights
        self._sums = self._sums.to(hsics.device) + hsics.sum(dim=0)
        self.chunks += len(sizes)

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


def _rounding(x: Tensor, y: Tensor) -> tuple[float, float]:
    """The rounding level of each side's own dtype (its noise floor)."""
    return torch.finfo(x.dtype).eps, torch.finfo(y.dtype).eps


def _chunk_means(data: Tensor, sizes: list[int], dtype: torch.dtype) -> list[Tensor]:
    """Each chunk's column means in ``dtype``; the leading chunks of equal size in one batched reduction."""
    full = sum(size == sizes[0] for size in sizes)  # chunk_bounds: equal chunks, then at most one other
    means = list(data[: full * sizes[0]].reshape(full, sizes[0], -1).mean(dim=1, dtype=dtype).unbind(0))
    return means + [data[full * sizes[0] :].mean(dim=0, dtype=dtype)] * (len(sizes) - full)


def _chunk_statistics(centred_x: Tensor, mean_x: Tensor, centred_y: Tensor, mean_y: Tensor) -> Tensor:
    """What a chunk's unbiased HSICs need, ``(10,)``: its kernels' inner products, diagonals, traces and means.

    ``<K, L>``, ``<K, K>``, ``<L, L>``, ``d_K . d_L``, ``d_K . d_K``, ``d_L . d_L``, ``tr K``, ``tr L``, ``|mean_x|^2``,
    ``|mean_y|^2``, with ``K``, ``L`` the linear kernels of the centred rows and ``d_K``, ``d_L`` their diagonals.
    """
    kernel_x, kernel_y = centred_x @ centred_x.T, centred_y @ centred_y.T
    flat_x, flat_y = kernel_x.reshape(-1), kernel_y.reshape(-1)
    diagonals = torch.stack([kernel_x.diagonal(), kernel_y.diagonal()])
    small = diagonals @ diagonals.T
    return torch.stack(
        [
            torch.dot(flat_x, flat_y),
            torch.dot(flat_x, flat_x),
            torch.dot(flat_y, flat_y),
            small[0, 1],
            small[0, 0],
            small[1, 1],
            *diagonals.sum(dim=1),
            torch.dot(mean_x, mean_x),
            torch.dot(mean_y, mean_y),
        ]
    )


def _unbiased_hsics(statistics: Tensor, sizes: Tensor) -> Tensor:
    r"""The unbiased HSIC (Song et al. 2012, eq. 5) of ``(K, L)``, ``(K, K)``, ``(L, L)`` per chunk: ``(c, 3)``.

    .. math::
        \mathrm{HSIC}_1(K, L) = \frac{1}{n(n-3)} \Big[ \mathrm{tr}(\tilde K \tilde L)
            + \frac{\mathbf 1^\top \tilde K \mathbf 1 \; \mathbf 1^\top \tilde L \mathbf 1}{(n-1)(n-2)}
            - \frac{2}{n-2} \mathbf 1^\top \tilde K \tilde L \mathbf 1 \Big]

    with ``K~``, ``L~`` the kernels with their diagonals ``d_K``, ``d_L`` zeroed. The rows are centred, so
    ``K 1 = Xc (Xc^T 1) = 0``: ``tr(K~ L~) = <K, L> - d_K . d_L``, ``1^T K~ 1 = -tr K`` and
    ``1^T K~ L~ 1 = d_K . d_L``, from :func:`_chunk_statistics` (no row sums, no ``n x n`` temporary).
    """
    n = sizes[:, None]
    inner, diagonal = statistics[:, 0:3], statistics[:, 3:6]
    traces = statistics[:, 6:8]
    first, second = [0, 0, 1], [1, 0, 1]  # the pairs (K, L), (K, K), (L, L)
    products = traces[:, first] * traces[:, second]
    return (inner - diagonal + products / ((n - 1) * (n - 2)) - 2.0 * diagonal / (n - 2)) / (n * (n - 3))


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
    metric.add_rows(x, y, batch_size)
    return metric.compute()


def chunk_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``batch_size`` rows; a last one under 4 rows joins the previous."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_CHUNK:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds
