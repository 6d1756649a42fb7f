"""Neighbourhood measures (Huh et al. 2024, "The Platonic Representation Hypothesis"): mutual k-NN and CKNNA.

Both ask whether two representations put the same datapoints next to each other: each datapoint's ``k`` nearest
other datapoints by cosine similarity, in ``x`` and in ``y``. :func:`mutual_knn` counts the shared neighbours;
:func:`cknna` is CKA restricted to the pairs that are neighbours in both. Both cost ``O(n^2 d)`` time and
``O(n^2)`` memory (the two ``n x n`` similarity matrices; the neighbours are kept as ``n k`` sorted pair keys, so
everything after the similarities and their top-k costs ``O(n k log(n k))``), and are defined for every ``k`` from
1 to ``n - 1``.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from torch import Tensor

from lightning_svcca.measures._checks import SimilarityWarning
from lightning_svcca.measures._samples import checked_pair, sparse_unbiased_hsic, unit_rows

__all__ = ["check_k", "cknna", "mutual_knn", "neighbour_keys", "neighbours", "own_alignment_warning"]


def check_k(k: object, n: int) -> int:
    """Return ``k`` as an int in ``[1, n - 1]`` (neighbours other than the datapoint itself), or raise."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int (neighbours per datapoint), got {k!r}")
    if not 1 <= int(k) <= n - 1:
        raise ValueError(
            f"k must be in [1, n - 1] = [1, {n - 1}] for {n} datapoints (each datapoint's neighbours exclude itself),"
            f" got {k}; lower k or use more datapoints"
        )
    return int(k)


def neighbour_keys(cosines: Tensor, k: int) -> Tensor:
    """Sorted flat keys ``i * n + j`` of each datapoint's ``k`` most similar others.

    ``cosines``' diagonal is overwritten with ``-inf`` (a datapoint is not its own neighbour).
    """
    n = cosines.shape[0]
    cosines.diagonal().fill_(-torch.inf)
    nearest = cosines.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    rows = torch.arange(n, device=cosines.device)[:, None]
    return (rows * n + nearest).reshape(-1)  # row-major with sorted columns: sorted, without a global sort


def neighbours(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The sorted keys of each datapoint's ``k`` nearest others by cosine similarity, and the cosines there.

    One side at a time: its ``n x n`` cosines are freed before the other side's are formed, so a measure holds
    one such matrix, not two (and reuses its memory rather than paging in a second one).
    """
    units = unit_rows(x)
    cosines = units @ units.T
    keys = neighbour_keys(cosines, k)
    return keys, cosines.reshape(-1).index_select(0, keys)  # a gather faster than advanced indexing


def own_alignment_warning(k: int, own_x: Tensor, own_y: Tensor, *, stacklevel: int) -> None:
    """Warn that CKNNA is 0 because a side's k-NN kernel has no positive unbiased alignment with itself."""
    warnings.warn(
        f"cknna: a side's k-NN kernel has no positive alignment with itself at k={k} (its unbiased HSIC is"
        f" {float(own_x):.3g} for x, {float(own_y):.3g} for y), so the ratio is undefined; returning 0. Use a"
        " larger k or more datapoints",
        SimilarityWarning,
        stacklevel=stacklevel,
    )


def mutual_knn(x: Tensor, y: Tensor, k: int = 10, *, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Mutual k-nearest-neighbour alignment (Huh et al. 2024).

    .. math::
        m_k(x, y) = \frac{1}{n} \sum_{i=1}^n \frac{|N_k^x(i) \cap N_k^y(i)|}{k}

    with :math:`N_k^x(i)` the ``k`` datapoints ``j != i`` of highest cosine similarity
    :math:`x_i^\top x_j / (\lVert x_i \rVert \lVert x_j \rVert)` (uncentred rows, as the authors' code: features
    normalised to unit length, then inner products). 1 when both sides rank neighbours alike, about
    ``k / (n - 1)`` for unrelated representations. Invariant to rotations and isotropic scaling of either side,
    and to any change that keeps each datapoint's neighbour ranking; not to translation (cosine similarity
    depends on the origin). A zero row is similar to no datapoint (its cosine is taken as 0, as
    ``torch.nn.functional.normalize`` gives); ties between equally similar neighbours are broken arbitrarily.

    Args:
        x: ``(n, d1)`` representation.
        y: ``(n, d2)`` representation of the same datapoints.
        k: neighbours per datapoint, ``1 <= k <= n - 1``.
        dtype: precision of the similarities.

    Returns:
        0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes, NaN or Inf, ``k`` outside ``[1, n - 1]``.
        ZeroVarianceError: a side has no variance (every datapoint the same: neighbours are undefined).

    Example:
        >>> x = torch.randn(100, 8, dtype=torch.float64)
        >>> rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        >>> float(mutual_knn(x, 3.0 * x @ rotation, k=5))
        1.0
    """
    x, y = checked_pair(x, y, dtype, 2)
    k = check_k(k, x.shape[0])
    (keys_x, _), (keys_y, _) = neighbours(x, k), neighbours(y, k)
    return torch.isin(keys_x, keys_y, assume_unique=True).sum().to(x.dtype) / keys_x.numel()


def cknna(x: Tensor, y: Tensor, k: int = 10, *, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""Centred kernel nearest-neighbour alignment, CKNNA (Huh et al. 2024): CKA over mutual neighbours only.

    With cosine kernels :math:`K_{ij} = \cos(x_i, x_j)`, :math:`L_{ij} = \cos(y_i, y_j)` and the ``k``-NN masks
    :math:`A^x_{ij} = [j \in N_k^x(i)]`, :math:`A^y` (see :func:`mutual_knn`),

    .. math::
        \mathrm{CKNNA}(x, y) = \frac{\mathrm{HSIC}_1(K \circ A^x \circ A^y,\; L \circ A^x \circ A^y)}
            {\sqrt{\mathrm{HSIC}_1(K \circ A^x, K \circ A^x)\, \mathrm{HSIC}_1(L \circ A^y, L \circ A^y)}}

    with :math:`\mathrm{HSIC}_1` the unbiased estimator of Song et al. (2012): the estimator of the authors'
    reference code (``minyoungg/platonic-rep``, ``metrics.py``, ``unbiased=True``), computed in ``O(n k log(n k))``
    after the kernels and their top-k (the masked kernels have ``n k`` entries) instead of through an ``n x n x n``
    product. At ``k = n - 1`` every pair counts and CKNNA is
    debiased linear CKA of the cosine kernels; small ``k`` looks at local structure only. The reference code
    refuses ``k < 2`` and adds ``1e-6`` to the denominator; here every ``k`` in ``[1, n - 1]`` is allowed, the
    denominator is exact, and when a side's masked kernel has no positive alignment with itself (possible for
    small ``k`` or ``n``: its masks are not symmetric) the value is 0 with a :class:`SimilarityWarning`. For the
    same reason the estimator's term :math:`\mathbf 1^\top \tilde K \tilde L \mathbf 1` makes swapping ``x``
    and ``y`` change the value slightly (by about 1e-3 on 120 datapoints), as in the reference code.

    Args:
        x: ``(n, d1)`` representation, ``n >= 4``.
        y: ``(n, d2)`` representation of the same datapoints.
        k: neighbours per datapoint, ``1 <= k <= n - 1``.
        dtype: precision of the kernels.

    Returns:
        0-dim tensor: 1 for representations equal up to rotation and scale, near 0 for unrelated ones (it can
        be slightly negative).

    Raises:
        ValueError: bad shapes, NaN or Inf, fewer than 4 datapoints, ``k`` outside ``[1, n - 1]``.
        ZeroVarianceError: a side has no variance.

    Example:
        >>> x = torch.randn(100, 8, dtype=torch.float64)
        >>> round(float(cknna(x, 2.0 * x, k=10)), 6)
        1.0
    """
    x, y = checked_pair(x, y, dtype, 4)
    n, k = x.shape[0], check_k(k, x.shape[0])
    # 1. each side's k-NN pairs (sorted flat keys) with its kernel there, and the pairs neighbours on both sides.
    (keys_x, values_x), (keys_y, values_y) = neighbours(x, k), neighbours(y, k)
    shared = torch.isin(keys_x, keys_y, assume_unique=True)
    mutual = keys_x[shared]
    # 2. unbiased HSIC of the masked kernels (their entries on those pairs), each side's against itself.
    cross = sparse_unbiased_hsic(mutual, values_x[shared], mutual, values_y[torch.searchsorted(keys_y, mutual)], n)
    own_x = sparse_unbiased_hsic(keys_x, values_x, keys_x, values_x, n)
    own_y = sparse_unbiased_hsic(keys_y, values_y, keys_y, values_y, n)
    if not (float(own_x) > 0 and float(own_y) > 0):
        own_alignment_warning(k, own_x, own_y, stacklevel=3)
        return cross.new_zeros(())
    return cross / (own_x * own_y).sqrt()
