"""Each measure computed from what every measure is a function of: the spectra, ``M = Ux^T Uy`` and the rows.

The public measures (:mod:`~lightning_svcca.measures.cca`, :mod:`~lightning_svcca.measures.cka`) check and
decompose their inputs, then call these; the training-time snapshot metrics call them on stored bases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_svcca.measures.decomposition import Decomposition


def canonical_correlations(cross: Tensor) -> Tensor:
    """Canonical correlations: singular values of the cross product of orthonormal bases, clamped to [0, 1].

    Taken as square roots of the eigenvalues of the smaller of ``M M^T`` and ``M^T M``: about half the cost of
    an SVD, and exact to ``sqrt(eps)`` even for correlations near 0 (ample for a similarity in [0, 1]).
    """
    small = cross @ cross.T if cross.shape[0] <= cross.shape[1] else cross.T @ cross
    return torch.linalg.eigvalsh(small).flip(0).clamp(0.0, 1.0).sqrt()


def pwcca_from_cross(dx: Decomposition, cross: Tensor) -> Tensor:
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


def cka_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
    """Linear CKA from the spectra and ``Ux^T Uy``: ``||Sx M Sy||_F^2 / (||Sx^2|| ||Sy^2||)``."""
    sx = dx.singular_values
    sy = dy.singular_values.to(sx.dtype)
    numerator = (sx[:, None] * cross * sy[None, :]).square().sum()
    return (numerator / (sx.square().norm() * sy.square().norm())).clamp(0.0, 1.0)


def centred_rows(decomposition: Decomposition) -> Tensor:
    """The centred datapoints up to a rotation of their coordinates: ``U diag(s)`` (or ``Xc W`` itself)."""
    d = decomposition
    dtype = d.singular_values.dtype
    if d.left is not None:
        return d.left.to(dtype) * d.singular_values
    centred = d.data.to(dtype) - d.mean
    return centred if d.column_scale is None else centred * d.column_scale


def procrustes_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
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


def rbf_cka_from_rows(rows_x: Tensor, rows_y: Tensor, bandwidth: float) -> Tensor:
    """RBF CKA of two sets of centred rows (same datapoints, same order)."""
    kx, ky = _rbf_kernel(rows_x, bandwidth, "x"), _rbf_kernel(rows_y.to(rows_x.dtype), bandwidth, "y")
    return ((kx * ky).sum() / (kx.norm() * ky.norm())).clamp(0.0, 1.0)


def debiased_cka_from_cross(dx: Decomposition, dy: Decomposition, cross: Tensor) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator of Song et al. (2012), from spectra, ``M`` and row norms.

    For centred data (``K 1 = 0``), with ``d_K = diag(K)`` (squared row norms) and ``K~`` the kernel with its
    diagonal zeroed: ``tr(K~ L~) = tr(KL) - d_K.d_L``, ``1^T K~ 1 = -tr K`` and ``1^T K~ L~ 1 = d_K.d_L``, so

        HSIC_1(K, L) = [tr(KL) - d_K.d_L + tr(K) tr(L) / ((n-1)(n-2)) - 2 d_K.d_L / (n-2)] / (n (n-3))

    and ``tr(KL) = ||Sx M Sy||_F^2``, ``tr(K^2) = sum(sx^4)``, ``tr(K) = sum(sx^2)``.
    """
    n = dx.n_datapoints
    sx = dx.singular_values
    sy = dy.singular_values.to(sx.dtype)
    rows_x, rows_y = centred_rows(dx), centred_rows(dy).to(sx.dtype)
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
