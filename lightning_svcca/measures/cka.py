"""The measures that weight directions by their variance: linear CKA, RBF CKA and Procrustes.

:func:`linear_cka` (optionally debiased), :func:`rbf_cka` and :func:`procrustes` are invariant to orthogonal
transforms, isotropic scaling and translation of either side, not to general linear maps (unlike the CCA family).
``docs/measures.md`` says which measure to use when.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_svcca.measures._checks import (
    ZeroVarianceError,
    check_dtype,
    check_pair,
    check_representation,
    zero_variance_message,
)
from lightning_svcca.measures._compute import (
    centred_rows,
    cka_from_cross,
    debiased_cka_from_cross,
    procrustes_from_cross,
    rbf_cka_from_rows,
)
from lightning_svcca.measures._linalg import block_products, column_mean, noise_floor, out_of_range
from lightning_svcca.measures.decomposition import Decomposition, cross_product, decompose_pair

__all__ = ["linear_cka", "procrustes", "rbf_cka"]


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
    check_dtype(dtype)
    if debiased or isinstance(x, Decomposition) or isinstance(y, Decomposition):
        dx, dy, cross_gram = decompose_pair(x, y, dtype)
        cross = cross_product(dx, dy, cross_gram=cross_gram)
        if not debiased:
            return cka_from_cross(dx, dy, cross)
        if dx.n_datapoints < 4:
            raise ValueError(f"linear_cka(debiased=True) needs at least 4 datapoints, got {dx.n_datapoints}")
        return debiased_cka_from_cross(dx, dy, cross)
    x = check_representation(x, "x")
    y = check_representation(y, "y")
    check_pair(x, y)
    # 1. centre; 2. HSIC numerator and normalisers from the Gram (or kernel) products.
    mean_x, mean_y = column_mean(x, dtype, "x"), column_mean(y, dtype, "y")
    n = x.shape[0]
    if n >= max(x.shape[1], y.shape[1]):
        gram_x, gram_y, cross_gram = block_products(x, mean_x, y, mean_y, own=True)
        cross = cross_gram.square().sum()
    else:
        xc, yc = x.to(dtype) - mean_x, y.to(dtype) - mean_y
        gram_x, gram_y = xc @ xc.T, yc @ yc.T  # the kernel matrices have the same Frobenius norms and traces
        cross = (gram_x * gram_y).sum()
    if out_of_range(gram_x) or out_of_range(gram_y):  # beyond about 1e150 or below 1e-150: rescale first
        dx, dy, cross_gram = decompose_pair(x, y, dtype)
        return cka_from_cross(dx, dy, cross_product(dx, dy, cross_gram=cross_gram))
    norm_x, norm_y = torch.linalg.matrix_norm(gram_x), torch.linalg.matrix_norm(gram_y)
    # 3. a side whose largest singular value (at most sqrt(||Xc^T Xc||_F)) is below its noise floor is constant.
    for name, data, gram, mean, norm in (("x", x, gram_x, mean_x, norm_x), ("y", y, gram_y, mean_y, norm_y)):
        mean_sq = n * float(mean.detach().square().sum())
        floor = noise_floor(float(gram.detach().diagonal().sum()), mean_sq, n, torch.finfo(data.dtype).eps, dtype)
        if math.sqrt(float(norm.detach())) <= floor:
            raise ZeroVarianceError(zero_variance_message(name))
    return (cross / (norm_x * norm_y)).clamp(0.0, 1.0)


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
    dx, dy, cross_gram = decompose_pair(x, y, dtype)
    return procrustes_from_cross(dx, dy, cross_product(dx, dy, cross_gram=cross_gram))


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
    dx, dy, _ = decompose_pair(x, y, dtype)
    return rbf_cka_from_rows(centred_rows(dx), centred_rows(dy), bandwidth)
