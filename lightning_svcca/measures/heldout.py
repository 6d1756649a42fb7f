"""Held-out CCA, SVCCA and PWCCA: canonical directions fitted on some datapoints, correlations measured on others.

In-sample CCA is biased upwards: with ``d`` directions and ``n`` datapoints, two *independent* representations
already give a mean canonical correlation of roughly ``sqrt(d / n)`` (0.45 at the SVCCA tutorial's 5 datapoints
per direction). Held-out scoring removes that bias, as in Pasad et al. (2021), "Layer-wise analysis of a
self-supervised speech representation model":

1. split the datapoints into ``folds`` parts (a seeded permutation, so the split is deterministic);
2. for each fold, the other parts are the training set; a ``dev_fraction`` of it picks the ridge ``epsilon``
   from ``epsilons`` (the value whose fit on the rest gives the best held-out score on the dev part);
3. fit regularised CCA on the whole training set with that ridge, each side centred with its training means;
4. project the fold's datapoints onto the fitted canonical directions and correlate each pair (Pearson, so
   the fold is re-centred);
5. average the per-direction correlations over folds.

Held-out correlations are signed: unrelated representations give values around 0 (of either sign), identical
ones 1. The ridge is relative: ``epsilon`` times the mean variance of a side's kept directions is added to every
direction's variance (``0``: plain CCA). The inputs are detached: held-out values are for reporting, not for
backpropagation (the fold split and the ridge choice are not differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_svcca.measures._checks import KeepBy, check_dtype, check_keep, check_pair, check_representation
from lightning_svcca.measures._linalg import kept_count
from lightning_svcca.measures.decomposition import decompose_checked

__all__ = ["EPSILONS", "cca_heldout", "pwcca_heldout", "svcca_heldout"]

#: Relative ridges tried on the dev part when ``epsilon`` is not given.
EPSILONS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def cca_heldout(
    x: Tensor,
    y: Tensor,
    epsilon: float | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
    dev_fraction: float = 0.25,
    epsilons: Sequence[float] = EPSILONS,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Held-out canonical correlations (see the module docstring for the procedure).

    Args:
        x: ``(n, d1)`` representation.
        y: ``(n, d2)`` representation of the same datapoints.
        epsilon: relative ridge; ``None`` (default) picks it from ``epsilons`` on a dev part of each training set.
        folds: number of folds, ``>= 2``; every datapoint is held out once.
        seed: seed of the permutation that assigns datapoints to folds.
        dev_fraction: share of each training set used to pick ``epsilon``, in ``(0, 1)``.
        epsilons: the relative ridges tried, each ``>= 0``.
        dtype: precision of the fits.

    Returns:
        ``(k,)`` held-out correlations of the canonical pairs, in the order of their training correlations,
        averaged over folds (``k`` the smallest number of pairs any fold fitted). Signed, in ``[-1, 1]``.

    Raises:
        ValueError: bad shapes, values or split arguments, or too few datapoints for the folds.

    Example:
        >>> x = torch.randn(300, 4, dtype=torch.float64)
        >>> bool(cca_heldout(x, x @ torch.randn(4, 4, dtype=torch.float64)).min() > 0.999)
        True
    """
    return _heldout(x, y, None, "singular_values", epsilon, folds, seed, dev_fraction, epsilons, dtype, False)[0]


def svcca_heldout(
    x: Tensor,
    y: Tensor,
    keep: float | int = 0.99,
    keep_by: KeepBy = "singular_values",
    *,
    epsilon: float | None = None,
    folds: int = 5,
    seed: int = 0,
    dev_fraction: float = 0.25,
    epsilons: Sequence[float] = EPSILONS,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Held-out SVCCA: the singular directions are kept on each training set, then CCA as :func:`cca_heldout`.

    Args:
        x: ``(n, d1)`` representation.
        y: ``(n, d2)`` representation of the same datapoints.
        keep: see :func:`~lightning_svcca.measures.cca.svcca`, applied to each training set.
        keep_by: see :func:`~lightning_svcca.measures.cca.svcca`.
        epsilon: see :func:`cca_heldout`.
        folds: see :func:`cca_heldout`.
        seed: see :func:`cca_heldout`.
        dev_fraction: see :func:`cca_heldout`.
        epsilons: see :func:`cca_heldout`.
        dtype: precision of the fits.

    Returns:
        0-dim tensor: the mean held-out correlation, near 0 for unrelated representations, 1 for identical ones.
    """
    keep = check_keep(keep, keep_by)
    correlations = _heldout(x, y, keep, keep_by, epsilon, folds, seed, dev_fraction, epsilons, dtype, False)[0]
    return correlations.mean()


def pwcca_heldout(
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float | None = None,
    folds: int = 5,
    seed: int = 0,
    dev_fraction: float = 0.25,
    epsilons: Sequence[float] = EPSILONS,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Held-out PWCCA: held-out correlations weighted as in PWCCA, the weights taken from each training set.

    A canonical direction's weight is ``sum_j |<h_i, x_j>|`` (``h_i`` the unit-norm canonical variate of ``x``
    and ``x_j`` the centred neurons, both on the training set), as in
    :func:`~lightning_svcca.measures.cca.pwcca`; weights are averaged over folds.

    Args:
        x: ``(n, d1)`` representation (the weights come from it).
        y: ``(n, d2)`` representation of the same datapoints.
        epsilon: see :func:`cca_heldout`.
        folds: see :func:`cca_heldout`.
        seed: see :func:`cca_heldout`.
        dev_fraction: see :func:`cca_heldout`.
        epsilons: see :func:`cca_heldout`.
        dtype: precision of the fits.

    Returns:
        0-dim tensor, near 0 for unrelated representations, 1 for identical ones.
    """
    correlations, weights = _heldout(
        x, y, None, "singular_values", epsilon, folds, seed, dev_fraction, epsilons, dtype, True
    )
    return (weights * correlations).sum() / weights.sum()


# ----------------------------------------------------------------------------------------------------------------
# The procedure.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    """One side of a training set: its mean and whitened singular directions ``Xc V`` scaled by ``1 / s``."""

    mean: Tensor  # (1, d)
    right: Tensor  # (d, r)  V
    singular_values: Tensor  # (r,)
    left: Tensor  # (m, r)  U = Xc V / s


@dataclass(frozen=True)
class _Fit:
    """Regularised CCA of a training set: canonical weights of each side and the training correlations."""

    mean_x: Tensor
    mean_y: Tensor
    weights_x: Tensor  # (d1, k): x_centred @ weights_x are the canonical variates
    weights_y: Tensor  # (d2, k)
    alpha: Tensor  # (k,) PWCCA weights of the canonical directions, from the training set


def _heldout(  # noqa: PLR0913, PLR0917 - the three public measures' arguments, forwarded as they are
    x: Tensor,
    y: Tensor,
    keep: float | int | None,
    keep_by: str,
    epsilon: float | None,
    folds: int,
    seed: int,
    dev_fraction: float,
    epsilons: Sequence[float],
    dtype: torch.dtype,
    weighted: bool,
) -> tuple[Tensor, Tensor]:
    """Per-direction held-out correlations and PWCCA weights, averaged over folds."""
    check_dtype(dtype)
    x, y = check_representation(x, "x"), check_representation(y, "y")
    check_pair(x, y)
    grid = _check_split(x.shape[0], epsilon, folds, dev_fraction, epsilons)
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    correlations, weights = [], []
    for test in order.tensor_split(folds):
        train = order[~torch.isin(order, test)]
        if len(grid) == 1:
            chosen = grid[0]
        else:
            # 2. pick the ridge on a dev part of the training set
            split = max(1, round(dev_fraction * train.numel()))
            fit_part, dev_part = train[:-split], train[-split:]
            sides = _sides(x[fit_part], y[fit_part], keep, keep_by)
            scores = [_score(_solve(*sides, ridge), x[dev_part], y[dev_part], weighted) for ridge in grid]
            chosen = grid[max(range(len(grid)), key=lambda i: float(scores[i]))]
        # 3. refit on the whole training set; 4. correlate on the fold
        fit = _solve(*_sides(x[train], y[train], keep, keep_by), chosen)
        correlations.append(_pearson(fit, x[test], y[test]))
        weights.append(fit.alpha)
    # 5. average over folds (every fold has at least the smallest number of canonical pairs)
    count = min(c.shape[0] for c in correlations)
    return (
        torch.stack([c[:count] for c in correlations]).mean(dim=0),
        torch.stack([w[:count] for w in weights]).mean(dim=0),
    )


def _check_split(
    n: int, epsilon: float | None, folds: int, dev_fraction: float, epsilons: Sequence[float]
) -> tuple[float, ...]:
    """Validate the split arguments; return the ridges to try."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if n < 4 * folds:
        raise ValueError(
            f"held-out scoring with {folds} folds needs at least {4 * folds} datapoints (4 per fold), got {n};"
            " use fewer folds or more datapoints"
        )
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    grid = tuple(float(e) for e in ((epsilon,) if epsilon is not None else epsilons))
    if not grid or not all(e >= 0 for e in grid):
        raise ValueError(f"epsilon and epsilons must be >= 0 (relative ridges), got {grid}")
    return grid


def _side(data: Tensor, keep: float | int | None, keep_by: str, name: str) -> _Side:
    """Centre a training set's side with its own means and decompose it (cut to ``keep`` when given)."""
    decomposition = decompose_checked(data, name, data.dtype)
    count = decomposition.rank if keep is None else kept_count(decomposition.singular_values, keep, keep_by)
    mean = data.mean(dim=0, keepdim=True)
    right = decomposition.right[:, :count]
    if decomposition.column_scale is not None:
        right = right * decomposition.column_scale.reshape(-1, 1)
    singular_values = decomposition.singular_values[:count]
    return _Side(mean, right, singular_values, (data - mean) @ right / singular_values)


def _sides(x: Tensor, y: Tensor, keep: float | int | None, keep_by: str) -> tuple[_Side, _Side]:
    return _side(x, keep, keep_by, "x (training part)"), _side(y, keep, keep_by, "y (training part)")


def _solve(sx: _Side, sy: _Side, epsilon: float) -> _Fit:
    """Regularised CCA of a training set in its singular bases.

    With ridge ``lambda = epsilon * mean(s^2)`` per side, the canonical pairs are the singular vectors of
    ``T = diag(s_x / sqrt(s_x^2 + lambda_x)) Ux^T Uy diag(s_y / sqrt(s_y^2 + lambda_y))``, and the weights on the
    centred data are ``V diag(1 / sqrt(s^2 + lambda)) P`` (``P`` the singular vectors of ``T`` on that side).
    """
    shrink_x = (sx.singular_values.square() + epsilon * sx.singular_values.square().mean()).rsqrt()
    shrink_y = (sy.singular_values.square() + epsilon * sy.singular_values.square().mean()).rsqrt()
    t = (sx.singular_values * shrink_x)[:, None] * (sx.left.T @ sy.left) * (sy.singular_values * shrink_y)[None, :]
    p, _, q_t = torch.linalg.svd(t, full_matrices=False)
    weights_x = sx.right @ (shrink_x[:, None] * p)
    weights_y = sy.right @ (shrink_y[:, None] * q_t.T)
    # PWCCA weights: h_i = Ux diag(s shrink) P normalised; <h_i, x_j> = (h^T Xc)_ij = (h^T U diag(s) V^T)_ij
    variates = sx.left @ ((sx.singular_values * shrink_x)[:, None] * p)
    variates = variates / variates.norm(dim=0, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
    alpha = (variates.T @ sx.left * sx.singular_values) @ sx.right.T
    return _Fit(sx.mean, sy.mean, weights_x, weights_y, alpha.abs().sum(dim=1))


def _pearson(fit: _Fit, x: Tensor, y: Tensor) -> Tensor:
    """Correlation of each canonical pair's projections of held-out datapoints (re-centred on them)."""
    u, v = (x - fit.mean_x) @ fit.weights_x, (y - fit.mean_y) @ fit.weights_y
    u, v = u - u.mean(dim=0, keepdim=True), v - v.mean(dim=0, keepdim=True)
    norms = u.norm(dim=0) * v.norm(dim=0)
    # a pair that is constant on the held-out datapoints says nothing: correlation 0
    return torch.where(norms > 0, (u * v).sum(dim=0) / norms.clamp_min(torch.finfo(u.dtype).tiny), 0.0)


def _score(fit: _Fit, x: Tensor, y: Tensor, weighted: bool) -> Tensor:
    """The dev score of a ridge: mean held-out correlation (PWCCA-weighted for PWCCA)."""
    correlations = _pearson(fit, x, y)
    if weighted:
        return (fit.alpha * correlations).sum() / fit.alpha.sum()
    return correlations.mean()
