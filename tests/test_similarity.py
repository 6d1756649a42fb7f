"""Tests of lightning_svcca.measures against mathematics and independent numpy/scipy implementations.

Every expected number here comes from a reference written in this file (numpy formulas of the papers,
``scipy.linalg.subspace_angles``) or from an analytic property, never from the code under test.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_svcca import (
    Decomposition,
    SimilarityWarning,
    TooFewDatapointsWarning,
    ZeroVarianceError,
    cca,
    decompose,
    linear_cka,
    pwcca,
    svcca,
    svcca_details,
)

EPS64 = torch.finfo(torch.float64).eps
# Orthogonal transforms, products and SVDs in float64 have backward errors of a modest multiple of eps.
TIGHT = 1e3 * EPS64
# Canonical correlations are square roots of eigenvalues of M M^T (and, with n >= d, come through Gram matrices):
# an O(eps) error in rho^2 is an O(sqrt(eps)) error in a small rho. Compare correlations at that level.
LOOSE = 10 * math.sqrt(EPS64)
FEW_DATAPOINTS = "ignore::lightning_svcca.measures.TooFewDatapointsWarning"


# ----------------------------------------------------------------------------------------------------------------
# Data and independent references (numpy / scipy only).
# ----------------------------------------------------------------------------------------------------------------


def related_pair(n=500, d1=12, d2=9, seed=0, shared=6, noise=1.0):
    """Two float64 representations of the same datapoints sharing a ``shared``-dimensional latent, with offsets."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, shared))
    x = z @ rng.standard_normal((shared, d1)) + noise * rng.standard_normal((n, d1)) + rng.standard_normal(d1)
    y = z @ rng.standard_normal((shared, d2)) + noise * rng.standard_normal((n, d2)) + rng.standard_normal(d2)
    return torch.from_numpy(x), torch.from_numpy(y)


def decaying(n=600, d=30, seed=0, decades=2.0):
    """Data whose singular values decay geometrically over ``decades`` decades, in a random basis."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0.0, -decades, d)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return torch.from_numpy((rng.standard_normal((n, d)) * scales) @ basis)


def linear_map_of(x, seed=0, noise=0.01):
    """``x A + noise`` with a well-conditioned random ``A``."""
    rng = np.random.default_rng(seed)
    d = x.shape[1]
    a = orthogonal(d, rng) @ np.diag(np.linspace(1.0, 3.0, d)) @ orthogonal(d, rng)
    return x @ torch.from_numpy(a) + noise * torch.from_numpy(rng.standard_normal(tuple(x.shape)))


def orthogonal(d, rng):
    """Random orthogonal matrix: Q of the QR of a Gaussian matrix."""
    return np.linalg.qr(rng.standard_normal((d, d)))[0]


def np_centre(a):
    a = np.asarray(a, dtype=np.float64)
    return a - a.mean(axis=0)


def ref_cca(x, y):
    """Cosines of the principal angles between the centred column spaces (scipy), descending."""
    qx, qy = scipy.linalg.orth(np_centre(x)), scipy.linalg.orth(np_centre(y))
    return np.sort(np.cos(scipy.linalg.subspace_angles(qx, qy)))[::-1]


def np_basis(a):
    """Left singular vectors and singular values of the centred ``a``, cut at numerical rank (as scipy's orth)."""
    a = np_centre(a)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    rank = int((s > s[0] * max(a.shape) * EPS64).sum())
    return u[:, :rank], s[:rank], vt[:rank]


def np_kept(s, keep, keep_by):
    """Fewest top directions whose cumulative sum reaches ``keep`` of the total; an int keeps that many."""
    if isinstance(keep, int):
        return min(keep, len(s))
    weights = s if keep_by == "singular_values" else s**2
    cumulative = np.cumsum(weights)
    return int(np.argmax(cumulative >= keep * cumulative[-1])) + 1


def ref_svcca(x, y, keep=0.99, keep_by="singular_values"):
    """SVCCA (Raghu et al. 2017): SVD truncation of each side, then CCA of the kept bases; mean, rho, kept."""
    ux, sx, _ = np_basis(x)
    uy, sy, _ = np_basis(y)
    kx, ky = np_kept(sx, keep, keep_by), np_kept(sy, keep, keep_by)
    rho = np.linalg.svd(ux[:, :kx].T @ uy[:, :ky], compute_uv=False)
    return rho.mean(), rho, (kx, ky)


def ref_pwcca(x, y):
    """PWCCA as written in Morcos et al. 2018, weights from the neurons of x."""
    xc = np_centre(x)
    qx, _, _ = np_basis(x)
    qy, _, _ = np_basis(y)
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ a  # canonical variates of x, orthonormal columns
    alpha = np.abs(h.T @ xc).sum(axis=1)  # alpha_i = sum_j |<h_i, x_j>|
    return float((alpha * rho).sum() / alpha.sum())


def ref_linear_cka(x, y):
    """||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = np_centre(x), np_centre(y)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def ref_ridge_cca(x, y, epsilon):
    """Regularised CCA: singular values of Sxx^{-1/2} Sxy Syy^{-1/2}, with eps I on the covariances."""
    xc, yc = np_centre(x), np_centre(y)
    n = xc.shape[0]

    def inverse_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v / np.sqrt(w)) @ v.T

    sxx = xc.T @ xc / (n - 1) + epsilon * np.eye(xc.shape[1])
    syy = yc.T @ yc / (n - 1) + epsilon * np.eye(yc.shape[1])
    sxy = xc.T @ yc / (n - 1)
    return np.linalg.svd(inverse_sqrt(sxx) @ sxy @ inverse_sqrt(syy), compute_uv=False)


def assert_correlations(got, expected, atol=LOOSE):
    got = got.detach().cpu().double().numpy()
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert np.isfinite(got).all()
    assert (got >= 0).all() and (got <= 1).all()
    assert np.all(np.diff(got) <= 0), "correlations must be in descending order"
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def in_unit_interval(value):
    value = float(value)
    return math.isfinite(value) and 0.0 <= value <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# Invariances.
# ----------------------------------------------------------------------------------------------------------------


def _rotate(a, rng):
    return a @ torch.from_numpy(orthogonal(a.shape[1], rng))


def _scale_up(a, rng):
    return 250.0 * a


def _scale_down(a, rng):
    return 1e-3 * a


def _translate(a, rng):
    return a + torch.from_numpy(5.0 * rng.standard_normal(a.shape[1]))


def _invertible(a, rng):
    # Well-conditioned (condition number 8) but far from orthogonal.
    d = a.shape[1]
    return a @ torch.from_numpy(orthogonal(d, rng) @ np.diag(np.linspace(0.5, 4.0, d)) @ orthogonal(d, rng))


def _permute_and_flip(a, rng):
    d = a.shape[1]
    return a[:, torch.from_numpy(rng.permutation(d))] * torch.from_numpy(rng.choice([-1.0, 1.0], d))


MEASURES = {
    "cca": cca,
    "svcca": lambda x, y, **kwargs: svcca(x, y, keep=0.99, **kwargs),
    "svcca_keep_all": lambda x, y, **kwargs: svcca(x, y, keep=1.0, **kwargs),
    "svcca_variance": lambda x, y, **kwargs: svcca(x, y, keep=0.9, keep_by="variance", **kwargs),
    "pwcca": pwcca,
    "linear_cka": linear_cka,
}
SIMILARITY_TRANSFORMS = {
    "rotate": _rotate,
    "scale_up": _scale_up,
    "scale_down": _scale_down,
    "translate": _translate,
    "permute_and_flip": _permute_and_flip,
}
# (measure, transforms it is invariant to on x, on y). PWCCA weights by the L1 size of x's neurons' projections:
# permuting or flipping x's neurons keeps those, a rotation of x does not; any invertible map of y keeps the
# canonical variates of x and the correlations.
INVARIANCES = [
    ("cca", {*SIMILARITY_TRANSFORMS, "invertible"}, {*SIMILARITY_TRANSFORMS, "invertible"}),
    ("svcca", set(SIMILARITY_TRANSFORMS), set(SIMILARITY_TRANSFORMS)),
    ("svcca_keep_all", {*SIMILARITY_TRANSFORMS, "invertible"}, {*SIMILARITY_TRANSFORMS, "invertible"}),
    ("svcca_variance", set(SIMILARITY_TRANSFORMS), set(SIMILARITY_TRANSFORMS)),
    ("pwcca", set(SIMILARITY_TRANSFORMS) - {"rotate"}, {*SIMILARITY_TRANSFORMS, "invertible"}),
    ("linear_cka", set(SIMILARITY_TRANSFORMS), set(SIMILARITY_TRANSFORMS)),
]
TRANSFORMS = {**SIMILARITY_TRANSFORMS, "invertible": _invertible}
INVARIANCE_CASES = [
    pytest.param(measure, transform, side, id=f"{measure}-{transform}-{side}")
    for measure, on_x, on_y in INVARIANCES
    for side, allowed in (("x", on_x), ("y", on_y))
    for transform in sorted(allowed)
]


@pytest.mark.parametrize(("measure", "transform", "side"), INVARIANCE_CASES)
def test_invariance(measure, transform, side):
    x, y = related_pair(n=500, d1=12, d2=9, seed=1)
    rng = np.random.default_rng(2)
    if side == "x":
        x2, y2 = TRANSFORMS[transform](x, rng), y
    else:
        x2, y2 = x, TRANSFORMS[transform](y, rng)
    before, after = MEASURES[measure](x, y), MEASURES[measure](x2, y2)
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, rtol=0, atol=LOOSE)


def test_invariance_checks_are_not_vacuous():
    # The measures do react to a change of the data: pairing datapoints differently changes each of them.
    x, y = related_pair(n=500, d1=12, d2=9, seed=1)
    shuffled = y[torch.from_numpy(np.random.default_rng(0).permutation(500))]
    for name, measure in MEASURES.items():
        assert float((measure(x, y) - measure(x, shuffled)).abs().max()) > 0.1, name


@pytest.mark.parametrize("side", ["x", "y"])
def test_linear_cka_not_invariant_to_anisotropic_scaling(side):
    x, y = related_pair(n=500, d1=4, d2=4, seed=3, shared=4, noise=0.5)
    stretch = torch.diag(torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64))
    x2, y2 = (x @ stretch, y) if side == "x" else (x, y @ stretch)
    assert abs(float(linear_cka(x2, y2)) - float(linear_cka(x, y))) > 0.05
    # ... while CCA, which whitens each side, does not notice.
    torch.testing.assert_close(cca(x2, y2), cca(x, y), rtol=0, atol=LOOSE)


@pytest.mark.parametrize("measure", ["cca", "svcca", "svcca_keep_all", "linear_cka"])
def test_symmetric_measures(measure):
    x, y = related_pair(n=400, d1=15, d2=6, seed=4)
    torch.testing.assert_close(MEASURES[measure](y, x), MEASURES[measure](x, y), rtol=0, atol=LOOSE)


# ----------------------------------------------------------------------------------------------------------------
# CCA = cosines of principal angles (scipy.linalg.subspace_angles).
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize(
    ("n", "d1", "d2"),
    [
        (500, 10, 7),  # n >> d, x wider
        (500, 7, 10),  # n >> d, y wider
        (2000, 20, 5),
        (100, 100, 100),  # d = n: centring leaves rank n - 1
        (60, 80, 30),  # d > n on x only
        (30, 10, 60),  # d > n on y only
        (40, 70, 90),  # d > n on both: both span the whole centred space
    ],
)
def test_cca_is_cosine_of_principal_angles(n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=n + d1 + d2, shared=5)
    assert_correlations(cca(x, y), ref_cca(x, y))
    assert_correlations(cca(y, x), ref_cca(x, y))


def _low_rank(n, d, rank, rng):
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize(
    ("n", "d1", "rank1", "d2", "rank2"),
    [
        # Each side is its own rank-r part plus 3 shared latents: rank r + 3 in d features.
        (300, 20, 3, 10, 10),  # x of rank 6 in 20 features
        (300, 10, 10, 25, 4),  # y of rank 7 in 25 features
        (300, 30, 8, 30, 5),  # both
        (40, 60, 15, 50, 12),  # d > n and rank-deficient (ranks 18 and 15 < n - 1)
    ],
)
def test_cca_rank_deficient_matches_principal_angles_of_non_null_part(n, d1, rank1, d2, rank2):
    rng = np.random.default_rng(n + d1 + d2)
    z = rng.standard_normal((n, 3))
    x = _low_rank(n, d1, rank1, rng) + z @ rng.standard_normal((3, d1))
    y = _low_rank(n, d2, rank2, rng) + z @ rng.standard_normal((3, d2))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    expected = ref_cca(x, y)  # scipy.linalg.orth of the centred data: the non-null part
    assert len(expected) == min(np.linalg.matrix_rank(np_centre(x)), np.linalg.matrix_rank(np_centre(y)))
    assert_correlations(cca(x, y), expected)


def test_exactly_low_rank_layer_gives_its_rank_in_correlations():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((500, 3))
    x = torch.from_numpy(z @ rng.standard_normal((3, 20)))  # d = 20, rank 3
    y = torch.from_numpy(rng.standard_normal((500, 10)) + z @ rng.standard_normal((3, 10)))
    got = cca(x, y)
    assert got.shape == (3,)
    assert_correlations(got, ref_cca(x, y))
    assert decompose(x).rank == 3
    details = svcca_details(x, y, keep=1.0)
    assert details.rank == (3, 10) and details.kept == (3, 10)


# ----------------------------------------------------------------------------------------------------------------
# SVCCA against the numpy reference.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize(
    ("keep", "keep_by"),
    [(0.99, "singular_values"), (0.9, "singular_values"), (0.5, "singular_values"), (1.0, "singular_values")]
    + [(0.99, "variance"), (0.9, "variance"), (1.0, "variance")]
    + [(1, "singular_values"), (5, "singular_values"), (12, "variance"), (1000, "singular_values")],
)
@pytest.mark.parametrize(("n", "d1", "d2"), [(600, 30, 20), (600, 20, 30), (50, 80, 60)])
def test_svcca_matches_numpy_reference(keep, keep_by, n, d1, d2):
    x = decaying(n, d1, seed=d1)
    y = linear_map_of(x[:, : min(d1, d2)], seed=1, noise=0.3)
    y = torch.cat([y, decaying(n, d2, seed=d2 + 1)[:, : d2 - y.shape[1]]], dim=1)
    expected_value, expected_rho, expected_kept = ref_svcca(x, y, keep, keep_by)
    details = svcca_details(x, y, keep=keep, keep_by=keep_by)
    assert details.kept == expected_kept
    assert details.rank == (np_basis(x)[1].size, np_basis(y)[1].size)
    assert_correlations(details.correlations, expected_rho)
    assert abs(float(details.value) - expected_value) <= LOOSE
    assert abs(float(svcca(x, y, keep=keep, keep_by=keep_by)) - expected_value) <= LOOSE


def test_keep_by_variance_keeps_fewer_directions_on_decaying_spectrum():
    x, y = decaying(1000, 40, seed=1), decaying(1000, 40, seed=2)
    by_values = svcca_details(x, y, keep=0.99, keep_by="singular_values")
    by_variance = svcca_details(x, y, keep=0.99, keep_by="variance")
    assert by_variance.kept[0] < by_values.kept[0] and by_variance.kept[1] < by_values.kept[1]
    assert by_values.kept == ref_svcca(x, y, 0.99, "singular_values")[2]
    assert by_variance.kept == ref_svcca(x, y, 0.99, "variance")[2]
    assert x.shape[1] > by_values.kept[0]  # the spectrum does truncate


@pytest.mark.parametrize("keep", [1, 3, 7, 40])
def test_int_keep_keeps_exactly_that_many(keep):
    x, y = related_pair(n=1000, d1=40, d2=30, seed=5)
    details = svcca_details(x, y, keep=keep)
    assert details.kept == (keep, min(keep, 30))
    assert details.correlations.shape == (min(keep, 30),)
    assert decompose(x).kept(keep) == keep


def test_keep_all_is_mean_of_cca():
    x, y = related_pair(n=700, d1=14, d2=11, seed=6)
    assert abs(float(svcca(x, y, keep=1.0)) - float(ref_cca(x, y).mean())) <= LOOSE


# ----------------------------------------------------------------------------------------------------------------
# Linear CKA and PWCCA against their formulas.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d1", "d2"), [(500, 12, 9), (500, 9, 12), (30, 80, 50), (40, 10, 100), (100, 100, 3)])
def test_linear_cka_matches_formula(n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=d1 * d2)
    expected = ref_linear_cka(x, y)
    assert abs(float(linear_cka(x, y)) - expected) <= TIGHT
    # Through decompositions the value comes from the spectra: the same number.
    assert abs(float(linear_cka(decompose(x), y)) - expected) <= LOOSE
    assert abs(float(linear_cka(x, decompose(y))) - expected) <= LOOSE


@pytest.mark.parametrize(("n", "d1", "d2"), [(600, 20, 8), (600, 8, 20), (600, 15, 15), (300, 40, 3)])
def test_pwcca_matches_morcos_formula(n, d1, d2):
    # x wider than y is the case google/svcca's compute_pwcca fails on (IndexError); it must work here.
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=d1 + 10 * d2, shared=5)
    got = pwcca(x, y)
    assert got.ndim == 0 and in_unit_interval(got)
    assert abs(float(got) - ref_pwcca(x, y)) <= LOOSE
    assert abs(float(pwcca(y, x)) - ref_pwcca(y, x)) <= LOOSE


def test_pwcca_is_not_symmetric_and_differs_from_svcca():
    x, y = related_pair(n=600, d1=20, d2=8, seed=11, shared=5)
    assert abs(ref_pwcca(x, y) - ref_pwcca(y, x)) > 0.01  # the reference itself is asymmetric here
    assert abs(float(pwcca(x, y)) - float(pwcca(y, x))) > 0.01
    assert abs(float(pwcca(x, y)) - float(svcca(x, y, keep=1.0))) > 0.01


# ----------------------------------------------------------------------------------------------------------------
# Known cases.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", sorted(MEASURES))
@pytest.mark.parametrize(("n", "d"), [(500, 10), (2000, 64)])
def test_identical_inputs_give_one(measure, n, d):
    x = related_pair(n=n, d1=d, d2=1, seed=d)[0]
    result = MEASURES[measure](x, x)
    torch.testing.assert_close(result, torch.ones_like(result), rtol=0, atol=LOOSE)


def test_independent_data_is_near_zero():
    # x (n x d1) and y (n x d2) independent Gaussian, n >> d. With Px, Py the projectors on the centred column
    # spaces, E[sum_i rho_i^2] = E tr(Px Py) = tr(Px E[Py]) = d1 d2 / (n - 1), so over k = min(d1, d2)
    # correlations the mean rho^2 is max(d1, d2) / (n - 1) and, by Jensen, E[mean rho] <= sqrt(max(d) / (n - 1)).
    # The largest squared correlation tends to Wachter's edge (sqrt(p(1-q)) + sqrt(q(1-p)))^2, p = d1/n, q = d2/n,
    # i.e. rho_max ~ (sqrt(d1) + sqrt(d2)) / sqrt(n) for small p, q, with O(n^(-2/3)) fluctuations.
    # Linear CKA: each entry of Xc^T Yc has variance n - 1, ||Xc^T Xc||_F >= (n - 1) sqrt(d1), so
    # CKA ~ sqrt(d1 d2) / (n - 1). A factor 2 (3 for CKA, a chi-square ratio) covers one draw.
    n, d1, d2 = 20000, 12, 8
    rng = np.random.default_rng(12)
    x, y = torch.from_numpy(rng.standard_normal((n, d1))), torch.from_numpy(rng.standard_normal((n, d2)))
    mean_bound = 2 * math.sqrt(max(d1, d2) / (n - 1))
    max_bound = 2 * (math.sqrt(d1) + math.sqrt(d2)) / math.sqrt(n)
    rho = cca(x, y)
    assert float(rho.max()) < max_bound
    assert float(rho.mean()) < mean_bound
    assert float(svcca(x, y, keep=1.0)) < mean_bound
    assert float(svcca(x, y)) < mean_bound
    assert float(pwcca(x, y)) < max_bound  # a weighted mean of the correlations
    assert float(linear_cka(x, y)) < 3 * math.sqrt(d1 * d2) / (n - 1)


@pytest.mark.parametrize(("n", "d"), [(2000, 16), (5000, 64)])
def test_linear_map_plus_small_noise_is_near_one(n, d):
    x = torch.from_numpy(np.random.default_rng(d).standard_normal((n, d)))
    y = linear_map_of(x, seed=d, noise=0.01)
    assert float(svcca(x, y)) > 0.99
    assert float(svcca(x, y, keep=1.0)) > 0.99
    assert float(pwcca(x, y)) > 0.99
    assert float(cca(x, y).min()) > 0.99


# ----------------------------------------------------------------------------------------------------------------
# Dtypes and devices.
# ----------------------------------------------------------------------------------------------------------------

INPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _rounding_bound(a, dtype):
    """Bound on how far rounding ``a`` to ``dtype`` moves its centred column space.

    Rounding changes each entry by at most eps |a_ij|: a perturbation E with ||E||_2 <= ||E||_F <= eps ||a||_F.
    By Wedin's theorem the sine of the largest principal angle between the old and the new centred column
    spaces is at most ||E||_2 / (s_min(a_c) - ||E||_2), and each canonical correlation moves by at most the sum
    of those sines over the two sides (cosines of principal angles are 1-Lipschitz in the projectors).
    """
    eps = torch.finfo(dtype).eps
    a = a.numpy()
    perturbation = eps * np.linalg.norm(a)
    s_min = np.linalg.svd(np_centre(a), compute_uv=False)[-1]
    return perturbation / (s_min - perturbation)


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_low_precision_inputs(dtype):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2000, 8)))
    y = linear_map_of(x, seed=1, noise=0.3)
    xd, yd = x.to(dtype), y.to(dtype)
    # 1. Same numbers as the float64 computation on the very same (rounded) values.
    x64, y64 = xd.double(), yd.double()
    for measure in (cca, svcca, pwcca, linear_cka):
        got = measure(xd, yd)
        assert got.device == xd.device
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.double(), measure(x64, y64), rtol=0, atol=TIGHT)
    # 2. Close to the float64 result on the unrounded data, within what the rounding can move it.
    bound = _rounding_bound(x, dtype) + _rounding_bound(y, dtype)
    torch.testing.assert_close(cca(xd, yd), cca(x, y), rtol=0, atol=bound)
    assert abs(float(svcca(xd, yd, keep=1.0)) - float(svcca(x, y, keep=1.0))) <= bound
    # CKA is a ratio of squared norms of products: a relative change of at most about 8x the same bound.
    assert abs(float(linear_cka(xd, yd)) - float(linear_cka(x, y))) <= 8 * bound


@pytest.mark.parametrize("measure", ["cca", "svcca", "pwcca", "linear_cka"])
@pytest.mark.parametrize(("n", "d1", "d2"), [(2000, 16, 12), (40, 60, 30)])
def test_float32_compute_option(measure, n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=3, noise=0.5)
    function = {"cca": cca, "svcca": svcca, "pwcca": pwcca, "linear_cka": linear_cka}[measure]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewDatapointsWarning)
        exact = function(x, y)
        single = function(x, y, dtype=torch.float32)
    # Correlations are square roots of eigenvalues of M M^T, whose backward error is about d eps ||M M^T|| <= d eps:
    # a small correlation is resolved to sqrt(d eps), a large one much better (data here is well-conditioned).
    tolerance = math.sqrt(max(d1, d2) * torch.finfo(torch.float32).eps)
    assert single.shape == exact.shape
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=tolerance)


def test_results_stay_on_input_device_cpu():
    x, y = related_pair(n=300, d1=8, d2=6)
    for measure in MEASURES.values():
        assert measure(x, y).device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "d1", "d2"), [(2000, 16, 12), (60, 80, 30)])
def test_cuda_matches_cpu(dtype, n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=8, noise=0.5)
    xg, yg = x.cuda(), y.cuda()
    tolerance = LOOSE if dtype == torch.float64 else math.sqrt(max(d1, d2) * torch.finfo(torch.float32).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewDatapointsWarning)
        for measure in (cca, svcca, pwcca, linear_cka):
            got = measure(xg, yg, dtype=dtype)
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu().double(), measure(x, y).double(), rtol=0, atol=tolerance)
        assert decompose(xg).singular_values.device.type == "cuda"
        assert svcca(decompose(xg), yg).device.type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_inputs():
    x, y = related_pair(n=2000, d1=8, d2=8, seed=9, noise=0.5)
    for dtype in (torch.float16, torch.bfloat16):
        got = svcca(x.to("cuda", dtype), y.to("cuda", dtype))
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), svcca(x.to(dtype).double(), y.to(dtype).double()), atol=LOOSE, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Decomposition reuse.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize(("n", "d1", "d2"), [(800, 20, 12), (40, 60, 30), (40, 20, 60)])
def test_decomposition_reuse(n, d1, d2):
    x, _ = related_pair(n=n, d1=d1, d2=d2, seed=13)
    dx = decompose(x)
    assert isinstance(dx, Decomposition) and decompose(dx) is dx
    assert dx.n_datapoints == n and dx.n_features == d1
    np.testing.assert_allclose(dx.singular_values.numpy(), np_basis(x)[1], rtol=0, atol=LOOSE * np_basis(x)[1][0])
    for seed in range(3):  # one decomposition against many y's
        y = related_pair(n=n, d1=d1, d2=d2, seed=100 + seed)[1]
        for keep in (0.99, 1.0, 5):
            assert abs(float(svcca(dx, y, keep=keep)) - float(svcca(x, y, keep=keep))) <= TIGHT
        assert abs(float(svcca(dx, decompose(y))) - float(svcca(x, y))) <= TIGHT
        # the smallest of 30 correlations when d > n is ill-conditioned: the two routes' rounding differs there by a
        # few hundred eps (2.6e-13 with this machine's OpenBLAS kernels), the others to TIGHT
        torch.testing.assert_close(cca(dx, y), cca(x, y), rtol=0, atol=10 * TIGHT)
        assert abs(float(pwcca(dx, y)) - float(pwcca(x, y))) <= TIGHT
        assert abs(float(pwcca(y, dx)) - ref_pwcca(y, x)) <= LOOSE
        assert abs(float(linear_cka(dx, y)) - float(linear_cka(x, y))) <= LOOSE


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
def test_pwcca_needs_right_vectors_of_x():
    x, y = related_pair(n=30, d1=50, d2=5)  # d > n: the decomposition keeps the basis U
    dx = dataclasses.replace(decompose(x), right=None)
    with pytest.raises(ValueError, match="pwcca needs the right singular vectors of x"):
        pwcca(dx, y)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    x, y = related_pair(n=50, d1=6, d2=5)
    nan_x, inf_y, neg_inf_y = x.clone(), y.clone(), y.clone()
    nan_x[3, 2] = float("nan")
    inf_y[7, 1] = float("inf")
    neg_inf_y[0, 4] = float("-inf")
    rows = r"same number of datapoints \(rows\), got 50 and 49"
    calls = [
        ("x-1d", lambda f: f(x[:, 0], y), ValueError, r"x must be 2-D .*got shape \(50,\)"),
        ("y-1d", lambda f: f(x, y[:, 0]), ValueError, r"y must be 2-D"),
        ("x-3d", lambda f: f(x.reshape(50, 2, 3), y), ValueError, r"x must be 2-D .*got shape \(50, 2, 3\)"),
        ("y-3d", lambda f: f(x, y.reshape(5, 10, 5)), ValueError, r"y must be 2-D"),
        ("rows-differ", lambda f: f(x, y[:49]), ValueError, rows),
        ("rows-differ-decomposed", lambda f: f(decompose(x), y[:49]), ValueError, rows),
        ("one-datapoint", lambda f: f(x[:1], y[:1]), ValueError, r"x needs at least 2 datapoints"),
        (
            "no-datapoints-y",
            lambda f: f(x, y[:0]),
            ValueError,
            r"y needs at least 2 datapoints \(rows\) to centre, got 0",
        ),
        ("no-features", lambda f: f(x[:, :0], y), ValueError, r"x has no features"),
        ("nan-x", lambda f: f(nan_x, y), ValueError, r"x holds 1 NaN or Inf value\(s\), the first at row 3, column 2"),
        ("inf-y", lambda f: f(x, inf_y), ValueError, r"y holds 1 NaN or Inf value\(s\), the first at row 7, column 1"),
        ("neg-inf-y", lambda f: f(x, neg_inf_y), ValueError, r"y holds 1 NaN or Inf .*row 0, column 4"),
        ("inf-as-x", lambda f: f(inf_y, x), ValueError, r"^x holds 1 NaN or Inf"),
        ("dtype-float16", lambda f: f(x, y, dtype=torch.float16), ValueError, r"dtype must be .*got torch.float16"),
        ("dtype-int", lambda f: f(x, y, dtype=torch.int64), ValueError, r"dtype must be .*got torch.int64"),
        ("complex", lambda f: f(x.to(torch.complex128), y), TypeError, r"x must be real"),
        ("not-a-tensor", lambda f: f(object(), y), TypeError, r"x must be a tensor"),
    ]
    return [pytest.param(call, error, match, id=name) for name, call, error, match in calls]


@pytest.mark.parametrize("measure", [cca, svcca, pwcca, linear_cka], ids=lambda f: f.__name__)
@pytest.mark.parametrize(("call", "error", "match"), _bad_calls())
def test_bad_input_raises(measure, call, error, match):
    with pytest.raises(error, match=match):
        call(measure)


@pytest.mark.parametrize(
    ("keep", "keep_by", "error", "match"),
    [
        (0.0, "singular_values", ValueError, r"keep as a fraction must be in \(0, 1\], got 0.0"),
        (-0.5, "singular_values", ValueError, r"keep as a fraction must be in \(0, 1\], got -0.5"),
        (1.5, "variance", ValueError, r"keep as a fraction must be in \(0, 1\], got 1.5"),
        (float("nan"), "singular_values", ValueError, r"keep as a fraction must be in \(0, 1\], got nan"),
        (0, "singular_values", ValueError, r"keep as a number of directions must be >= 1, got 0"),
        (-3, "singular_values", ValueError, r"keep as a number of directions must be >= 1, got -3"),
        ("0.9", "singular_values", TypeError, r"keep must be a float in \(0, 1\] or an int >= 1, got '0.9'"),
        (True, "singular_values", TypeError, r"keep must be a float .*got True"),
        (None, "singular_values", TypeError, r"keep must be a float .*got None"),
        (0.9, "energy", ValueError, r"keep_by must be one of \('singular_values', 'variance'\), got 'energy'"),
        (0.9, "Variance", ValueError, r"keep_by must be one of .*got 'Variance'"),
    ],
)
@pytest.mark.parametrize("function", [svcca, svcca_details], ids=lambda f: f.__name__)
def test_bad_keep_raises(function, keep, keep_by, error, match):
    x, y = related_pair(n=100, d1=5, d2=5)
    with pytest.raises(error, match=match):
        function(x, y, keep=keep, keep_by=keep_by)


@pytest.mark.parametrize("epsilon", [-1e-3, -1.0, -math.inf, math.nan])
def test_negative_epsilon_raises(epsilon):
    x, y = related_pair(n=100, d1=5, d2=5)
    with pytest.raises(ValueError, match=r"epsilon must be >= 0"):
        cca(x, y, epsilon=epsilon)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.complex64], ids=str)
def test_decompose_bad_dtype_option_raises(dtype):
    with pytest.raises(ValueError, match=r"dtype must be torch.float64 or torch.float32"):
        decompose(torch.randn(10, 3, dtype=torch.float64), dtype=dtype)


def test_zero_variance_error_is_value_error():
    assert issubclass(ZeroVarianceError, ValueError)
    assert issubclass(TooFewDatapointsWarning, SimilarityWarning)
    assert issubclass(SimilarityWarning, UserWarning)


def _constant_rows(values, dtype, n=50):
    """Every row the same (a dead layer, or the bias of a Linear after one): no variance at all."""
    return torch.tensor(values, dtype=torch.float64).to(dtype).expand(n, len(values)).clone()


_BIAS = np.random.default_rng(0).standard_normal(4).tolist()
_GRAM = ("cca", "svcca", "pwcca", "decompose")
# (name, input dtype, compute dtype, row values). Column means of 0s and of 2.0 * k are exact; the float64 mean
# of 50 copies of 0.3 * 3 is not, and a float64 bias computed in float32 is rounded by the cast: neither residue
# may pass for variance.
ZERO_VARIANCE_TABLE = [
    ("zeros", torch.float64, torch.float64, [0.0, 0.0, 0.0]),
    ("exact", torch.float64, torch.float64, [2.0, 4.0, 8.0]),
    ("inexact-float64", torch.float64, torch.float64, [0.3 * k for k in (1, 2, 3)]),
    ("bias-float32-in-float64", torch.float32, torch.float64, _BIAS),
    ("bias-float32-in-float32", torch.float32, torch.float32, _BIAS),
    ("bias-float64-in-float32", torch.float64, torch.float32, _BIAS),
]
ZERO_VARIANCE_CASES = [
    pytest.param(measure, side, values, input_dtype, compute_dtype, id=f"{measure}-{side}-{name}")
    for name, input_dtype, compute_dtype, values in ZERO_VARIANCE_TABLE
    for measure in (*_GRAM, "linear_cka")
    for side in (("x",) if measure == "decompose" else ("x", "y"))
]


@pytest.mark.parametrize(("measure", "side", "values", "input_dtype", "compute_dtype"), ZERO_VARIANCE_CASES)
def test_zero_variance_raises(measure, side, values, input_dtype, compute_dtype):
    constant = _constant_rows(values, input_dtype)
    # No variance beyond the rounding of the mean (relative: a few eps of the compute dtype).
    assert float(np.abs(np_centre(constant.double())).max()) < 10 * EPS64
    other = related_pair(n=50, d1=4, d2=1)[0].to(input_dtype)
    x, y = (constant, other) if side == "x" else (other, constant)
    with pytest.raises(ZeroVarianceError, match=rf"^{side} has zero variance: every datapoint has the same"):
        if measure == "decompose":
            decompose(constant, dtype=compute_dtype)
        else:
            MEASURES[measure](x, y, dtype=compute_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rank deficiency, duplicated and dead neurons, near collinearity.
# ----------------------------------------------------------------------------------------------------------------


def _with_duplicates(x, rng):
    return torch.cat([x, x[:, [0, 3, 3]]], dim=1), list(range(x.shape[1]))


def _with_constant_neurons(x, rng):
    constant = torch.tensor([[0.3, 5.0, 0.0]], dtype=torch.float64).expand(x.shape[0], 3)
    return torch.cat([constant, x], dim=1), list(range(3, 3 + x.shape[1]))


def _dead_relu(x, rng):
    # Pre-activations of the first 3 units are always negative: after the ReLU those units are exactly 0.
    pre = x.clone()
    pre[:, :3] = -pre[:, :3].abs() - 0.1
    return torch.relu(pre), list(range(3, x.shape[1]))


def _with_combination(x, rng):
    extra = x[:, :4] @ torch.from_numpy(rng.standard_normal((4, 2)))  # linearly dependent neurons
    return torch.cat([x, extra], dim=1), list(range(x.shape[1]))


NULL_PARTS = {
    "duplicates": _with_duplicates,
    "constant_neurons": _with_constant_neurons,
    "dead_relu": _dead_relu,
    "linear_combinations": _with_combination,
}


@pytest.mark.parametrize("side", ["x", "y"])
@pytest.mark.parametrize("kind", sorted(NULL_PARTS))
def test_null_part_is_ignored(kind, side):
    rng = np.random.default_rng(21)
    x, y = related_pair(n=500, d1=10, d2=8, seed=21)
    if kind == "dead_relu":  # compare with the ReLU applied to the live units as well
        x, y = torch.relu(x), torch.relu(y)
    if side == "x":
        degenerate, live = NULL_PARTS[kind](x, rng)
        full, clean = (degenerate, y), (degenerate[:, live], y)
    else:
        degenerate, live = NULL_PARTS[kind](y, rng)
        full, clean = (x, degenerate), (x, degenerate[:, live])
    got = cca(*full)
    assert_correlations(got, ref_cca(*clean))
    # Zero (centred) columns change nothing at all. Redundant columns leave the span, hence CCA and SVCCA at
    # keep=1.0, unchanged, and PWCCA when they are in y (only y's span enters); they do change the spectrum
    # (so what keep < 1 keeps), linear CKA and PWCCA's weights when they are in x.
    zero_columns = kind in {"constant_neurons", "dead_relu"}
    same = set(MEASURES) if zero_columns else {"cca", "svcca_keep_all"} | ({"pwcca"} if side == "y" else set())
    for name, measure in MEASURES.items():
        value = measure(*full)
        assert bool(torch.isfinite(value).all()) and float(value.min()) >= 0 and float(value.max()) <= 1, name
        if name in same:
            torch.testing.assert_close(value, measure(*clean), rtol=0, atol=LOOSE, msg=name)
    assert abs(float(svcca(*full, keep=1.0)) - float(ref_cca(*clean).mean())) <= LOOSE
    if zero_columns:
        assert abs(float(pwcca(*full)) - ref_pwcca(*clean)) <= LOOSE
        assert abs(float(linear_cka(*full)) - ref_linear_cka(*clean)) <= TIGHT
        assert abs(float(svcca(*full)) - ref_svcca(*clean)[0]) <= LOOSE


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize(("n", "d1", "d2"), [(30, 50, 40), (30, 50, 10), (30, 10, 50), (40, 200, 100)])
def test_more_features_than_datapoints(n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=n + d1)
    got = cca(x, y)
    expected = ref_cca(x, y)
    assert len(expected) == min(d1, d2, n - 1)
    assert_correlations(got, expected)
    for name, measure in MEASURES.items():
        assert in_unit_interval(measure(x, y).mean()), name
    assert abs(float(svcca(x, y)) - ref_svcca(x, y)[0]) <= LOOSE
    assert abs(float(pwcca(x, y)) - ref_pwcca(x, y)) <= LOOSE
    assert abs(float(linear_cka(x, y)) - ref_linear_cka(x, y)) <= TIGHT


@pytest.mark.parametrize("delta", [1e-2, 1e-4, 1e-5])
def test_nearly_collinear_neurons_resolved(delta):
    # x[:, 1] = x[:, 0] + delta * noise: a direction with singular value ~ delta relative to the others, still
    # above the Gram route's resolution sqrt(eps n). On that route Ux = Xc V / s with V, s from eigh of the Gram
    # matrix G, whose backward error is a small multiple of d eps ||G||: after whitening by 1/s, the entries of
    # Ux^T Uy that involve the smallest direction are off by up to d eps ||G|| / s_min^2 = d eps cond^2.
    rng = np.random.default_rng(31)
    x, y = related_pair(n=500, d1=6, d2=6, seed=31)
    x[:, 1] = x[:, 0] + delta * torch.from_numpy(rng.standard_normal(500))
    s = np.linalg.svd(np_centre(x.numpy()), compute_uv=False)
    tolerance = LOOSE + x.shape[1] * EPS64 * (s[0] / s[-1]) ** 2
    got = cca(x, y)
    assert float(got.max()) <= 1.0
    assert_correlations(got, ref_cca(x, y), atol=tolerance)
    assert_correlations(cca(x, x), np.ones(6), atol=tolerance)


@pytest.mark.parametrize("delta", [1e-9, 1e-12, 1e-15])
def test_nearly_collinear_neurons_below_resolution(delta):
    # The difference x[:, 1] - x[:, 0] is below what a float64 Gram matrix resolves: it is treated as null,
    # and nothing above 1 or NaN comes out of dividing by it.
    rng = np.random.default_rng(32)
    x, y = related_pair(n=500, d1=6, d2=6, seed=32)
    x[:, 1] = x[:, 0] + delta * torch.from_numpy(rng.standard_normal(500))
    for measure in MEASURES.values():
        value = measure(x, y)
        assert bool(torch.isfinite(value).all()) and float(value.max()) <= 1.0 and float(value.min()) >= 0.0
    got = cca(x, y)
    assert got.shape == (5,)
    # The kept subspace is that of x without its near-copy, up to a rotation by an angle of at most
    # ||delta noise|| / s_min(centred x without the copy) (Wedin); correlations move by at most that.
    without_copy = x[:, [0, 2, 3, 4, 5]]
    angle = delta * np.sqrt(500) / np.linalg.svd(np_centre(without_copy.numpy()), compute_uv=False)[-1]
    assert_correlations(got, ref_cca(without_copy, y), atol=LOOSE + 2 * angle)
    assert_correlations(cca(x, x), np.ones(5), atol=LOOSE)


# ----------------------------------------------------------------------------------------------------------------
# Ridge (epsilon > 0).
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(FEW_DATAPOINTS)
@pytest.mark.parametrize("epsilon", [1e-6, 1e-2, 0.1, 1.0, 10.0])
@pytest.mark.parametrize(("n", "d1", "d2"), [(500, 10, 7), (500, 7, 10), (40, 60, 30)])
def test_ridge_matches_regularised_cca(epsilon, n, d1, d2):
    x, y = related_pair(n=n, d1=d1, d2=d2, seed=41)
    got = cca(x, y, epsilon=epsilon)
    expected = ref_ridge_cca(x, y, epsilon)
    # With d > n, Sxx + eps I has d - rank(x) directions that carry no cross-covariance: their correlations are
    # exactly 0 in the reference, and not returned here (the result has min(rank(x), rank(y)) entries).
    rank = min(np.linalg.matrix_rank(np_centre(x)), np.linalg.matrix_rank(np_centre(y)))
    assert got.shape == (rank,)
    np.testing.assert_allclose(expected[rank:], 0.0, atol=LOOSE)
    assert_correlations(got, expected[:rank])


def test_ridge_shrinks_correlations():
    x, y = related_pair(n=500, d1=10, d2=7, seed=42)
    previous = cca(x, y)
    for epsilon in (1e-3, 1e-1, 1.0, 10.0, 1e3):
        current = cca(x, y, epsilon=epsilon)
        assert bool((current <= previous + LOOSE).all())
        assert float(current.sum()) < float(previous.sum())
        previous = current
    assert float(previous.max()) < 0.05


# ----------------------------------------------------------------------------------------------------------------
# Too few datapoints.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "measure"),
    [
        (lambda x, y: cca(x, y), "cca"),
        (lambda x, y: svcca(x, y, keep=1.0), "svcca"),
        (lambda x, y: svcca_details(x, y, keep=1.0), "svcca"),
        (lambda x, y: pwcca(x, y), "pwcca"),
    ],
)
def test_too_few_datapoints_warns(call, measure):
    x, y = related_pair(n=40, d1=20, d2=20, seed=51)  # 20 directions need 5 * 20 = 100 datapoints
    with pytest.warns(TooFewDatapointsWarning, match=rf"{measure} compares 20 directions using only 40 .*at least 100"):
        call(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(x, y)
    assert [w.filename for w in caught] == [__file__]  # stacklevel points at the caller
    assert issubclass(caught[0].category, SimilarityWarning)


def test_too_few_datapoints_counts_kept_directions():
    x, y = related_pair(n=40, d1=20, d2=20, seed=52)
    with pytest.warns(TooFewDatapointsWarning, match=r"svcca compares 9 directions .*at least 45 datapoints"):
        svcca(x, y, keep=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svcca(x, y, keep=8)  # 40 = 5 * 8 datapoints: enough
    assert not [w for w in caught if issubclass(w.category, SimilarityWarning)]


def test_plenty_of_datapoints_does_not_warn():
    x, y = related_pair(n=2000, d1=20, d2=20, seed=53)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for measure in MEASURES.values():
            measure(x, y)
    assert not [w for w in caught if issubclass(w.category, SimilarityWarning)]
