"""Tests of the added measures (r2cca, procrustes, rbf_cka, debiased linear CKA) and of the hardened math core.

Every expected number comes from a numpy/scipy implementation written here (the papers' formulas on explicit
kernels and cross-covariances) or from an invariance, never from the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck

from lightning_svcca.measures import (
    SimilarityWarning,
    ZeroVarianceError,
    cca,
    decompose,
    linear_cka,
    procrustes,
    pwcca,
    r2cca,
    rbf_cka,
    svcca,
    svcca_details,
)

pytestmark = pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")

EPS64 = np.finfo(np.float64).eps
# Measures built on eigenvalues of Gram matrices resolve squared quantities to eps: values to about sqrt(eps).
LOOSE = 10 * math.sqrt(EPS64)


def related(n=120, d1=8, d2=6, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1)) + rng.standard_normal(d1)
    y = x @ rng.standard_normal((d1, d2)) + noise * rng.standard_normal((n, d2)) + 3.0
    return x, y


def centre(a):
    return a - a.mean(axis=0)


def hsic_unbiased(k, l):  # noqa: E741 - the paper's symbol
    """Song et al. (2012), eq. (5), on explicit kernel matrices."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (
        np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def ref_debiased_cka(x, y):
    k, l = centre(x) @ centre(x).T, centre(y) @ centre(y).T  # noqa: E741
    return hsic_unbiased(k, l) / math.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))


def ref_procrustes(x, y):
    """1 - d/2 with d = min_Q ||X~ Q - Y~||_F^2 on unit-norm centred data, the minimum found by scipy."""
    xt, yt = centre(x), centre(y)
    xt, yt = xt / np.linalg.norm(xt), yt / np.linalg.norm(yt)
    width = max(xt.shape[1], yt.shape[1])  # zero-pad to a common width
    xp = np.pad(xt, ((0, 0), (0, width - xt.shape[1])))
    yp = np.pad(yt, ((0, 0), (0, width - yt.shape[1])))
    rotation, _ = scipy.linalg.orthogonal_procrustes(xp, yp)
    distance = np.linalg.norm(xp @ rotation - yp) ** 2
    return 1.0 - distance / 2.0


def ref_rbf_cka(x, y, factor=1.0):
    def kernel(a):
        sq = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        median = np.median(sq[np.triu_indices(a.shape[0], 1)])
        k = np.exp(-sq / (2.0 * factor**2 * median))
        h = np.eye(a.shape[0]) - 1.0 / a.shape[0]
        return h @ k @ h

    kx, ky = kernel(x), kernel(y)
    return (kx * ky).sum() / (np.linalg.norm(kx) * np.linalg.norm(ky))


def ref_r2cca(x, y):
    return float(np.mean(np.cos(scipy.linalg.subspace_angles(centre(x), centre(y))) ** 2))


REFERENCES = {
    "r2cca": (r2cca, ref_r2cca),
    "procrustes": (procrustes, ref_procrustes),
    "rbf_cka": (rbf_cka, ref_rbf_cka),
    "linear_cka_debiased": (lambda a, b: linear_cka(a, b, debiased=True), ref_debiased_cka),
}
# (n, d1, d2): the Gram route (n >= d) and the kernel route (n < d) on one or both sides.
SHAPES = [(120, 8, 6), (30, 40, 6), (25, 40, 50)]


@pytest.mark.parametrize("name", list(REFERENCES))
@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES, ids=["gram", "kernel-gram", "kernel-kernel"])
def test_matches_numpy_reference(name, n, d1, d2):
    function, reference = REFERENCES[name]
    x, y = related(n, d1, d2)
    if name == "r2cca" and n < max(d1, d2):
        y = y[:, : n // 3]  # x spans every centred direction when d1 >= n - 1: keep the value informative
    assert float(function(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(reference(x, y), abs=LOOSE)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_accepts_decompositions(name):
    function, reference = REFERENCES[name]
    x, y = related()
    value = function(decompose(torch.from_numpy(x)), torch.from_numpy(y))
    assert float(value) == pytest.approx(reference(x, y), abs=LOOSE)


def _orthogonal(d, seed):
    return torch.from_numpy(np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0])


# Which transforms of one side leave each measure unchanged (Kornblith et al. 2019, Table 1; Ding et al. 2021).
INVARIANT = {
    "r2cca": ("orthogonal", "isotropic", "translation", "invertible"),
    "procrustes": ("orthogonal", "isotropic", "translation"),
    "rbf_cka": ("orthogonal", "isotropic", "translation"),
    "linear_cka_debiased": ("orthogonal", "isotropic", "translation"),
}


def _transform(kind, x):
    if kind == "orthogonal":
        return x @ _orthogonal(x.shape[1], 5)
    if kind == "isotropic":
        return 7.5 * x
    if kind == "translation":
        return x + 100.0
    return x @ (torch.eye(x.shape[1], dtype=x.dtype) + 0.5 * torch.from_numpy(np.triu(np.ones((x.shape[1],) * 2))))


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n, kinds in INVARIANT.items() for k in kinds])
def test_invariances(name, kind):
    function = REFERENCES[name][0]
    x, y = (torch.from_numpy(a) for a in related(seed=3))
    before = float(function(x, y))
    assert float(function(_transform(kind, x), y)) == pytest.approx(before, abs=LOOSE)
    assert float(function(x, _transform(kind, y))) == pytest.approx(before, abs=LOOSE)


@pytest.mark.parametrize("name", ["procrustes", "rbf_cka", "linear_cka_debiased"])
def test_not_invariant_to_general_linear_maps(name):
    function = REFERENCES[name][0]
    x, y = (torch.from_numpy(a) for a in related(seed=3))
    stretched = x * torch.tensor([1.0, 10.0, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0], dtype=x.dtype)
    assert abs(float(function(stretched, y)) - float(function(x, y))) > 1e-3


@pytest.mark.parametrize("name", list(REFERENCES))
def test_identical_gives_one(name):
    x = torch.from_numpy(related()[0])
    assert float(REFERENCES[name][0](x, x)) == pytest.approx(1.0, abs=LOOSE)


def test_debiased_cka_is_near_zero_for_independent_data_unlike_the_biased_one():
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.standard_normal((300, 100))), torch.from_numpy(rng.standard_normal((300, 100)))
    assert float(linear_cka(x, y)) > 0.2  # the plain estimator: about d / n
    assert abs(float(linear_cka(x, y, debiased=True))) < 0.02


def test_rbf_bandwidth_changes_the_value_and_is_checked():
    x, y = related()
    for factor in (0.5, 2.0):
        value = float(rbf_cka(torch.from_numpy(x), torch.from_numpy(y), factor))
        assert value == pytest.approx(ref_rbf_cka(x, y, factor), abs=LOOSE)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        rbf_cka(torch.from_numpy(x), torch.from_numpy(y), 0.0)
    repeated = torch.zeros(20, 3, dtype=torch.float64)
    repeated[0] = 1.0
    with pytest.raises(ValueError, match="median distance"):
        rbf_cka(repeated, torch.from_numpy(x[:20]))


def test_debiased_needs_four_datapoints():
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 4 datapoints"):
        linear_cka(x, x, debiased=True)


# ----------------------------------------------------------------------------------------------------------------
# Hardening: scales, gradients, extreme values, keep.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [500, 8], ids=["gram", "kernel"])
def test_per_column_scales_do_not_change_cca(n):
    rng = np.random.default_rng(0)
    d = 3 if n > 8 else 12
    x = rng.standard_normal((n, d)) * np.logspace(-6, 6, d)
    y = rng.standard_normal((n, 4))
    y[:, 0] = 1e6 * x[:, 0]  # y follows the tiny column exactly
    y[:, 1] = 1e-6 * x[:, -1] + 0.1 * y[:, 1]  # and the huge one closely
    expected = np.sort(np.cos(scipy.linalg.subspace_angles(centre(x), centre(y))))[::-1]
    got = cca(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, expected, atol=LOOSE)
    if n > 8:
        assert got[0] > 0.99  # the 1e-6 column is not lost to the 1e6 one
    assert float(r2cca(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(np.mean(expected**2), abs=LOOSE)


def test_svcca_keeps_its_variance_based_truncation_under_column_scales():
    # SVCCA is not invariant to a column's scale: the 1e-6 column is a negligible direction and is cut.
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((500, 3)) * np.array([1e-6, 1.0, 1e6]))
    assert svcca_details(x, x, keep=0.99).kept == (1, 1)
    assert svcca_details(x, x, keep=1.0).kept == (2, 2)  # 1e-12 of the largest: below the Gram route's cut


def _gradcheck(function, x, y):
    return gradcheck(lambda a, b: function(a, b).sum(), (x, y), eps=1e-6, atol=1e-5)


GRADIENT_MEASURES = {
    "cca": cca,
    "svcca": lambda a, b: svcca(a, b, keep=2),
    "pwcca": pwcca,
    "linear_cka": linear_cka,
    "linear_cka_debiased": lambda a, b: linear_cka(a, b, debiased=True),
    "r2cca": r2cca,
    "procrustes": procrustes,
    "rbf_cka": rbf_cka,
}


@pytest.mark.parametrize("name", list(GRADIENT_MEASURES))
@pytest.mark.parametrize(("n", "d1", "d2"), [(30, 3, 4), (7, 9, 5)], ids=["gram", "kernel"])
def test_gradients_match_finite_differences(name, n, d1, d2):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d1, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(n, d2, dtype=torch.float64, generator=generator, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimilarityWarning)
        assert _gradcheck(GRADIENT_MEASURES[name], x, y)


def test_gradient_flows_into_a_layer():
    layer = torch.nn.Linear(6, 5).double()
    x = torch.randn(200, 6, dtype=torch.float64)
    value = svcca(layer(x), x @ torch.randn(6, 4, dtype=torch.float64), keep=1.0)
    value.backward()
    assert layer.weight.grad is not None and bool(torch.isfinite(layer.weight.grad).all())


@pytest.mark.parametrize("scale", [1e200, 1e-200])
@pytest.mark.parametrize("n", [100, 3], ids=["gram", "kernel"])
def test_huge_and_tiny_values_give_the_unscaled_value(scale, n):
    generator = torch.Generator().manual_seed(0)
    d = 4 if n > 3 else 6
    x = torch.randn(max(n, 6), d, dtype=torch.float64, generator=generator)
    y = x @ torch.randn(d, 3, dtype=torch.float64, generator=generator) + torch.randn(
        max(n, 6), 3, dtype=torch.float64, generator=generator
    )
    for name, function in {"svcca": svcca, "linear_cka": linear_cka, "procrustes": procrustes, "r2cca": r2cca}.items():
        expected = float(function(x, y))
        got = function(x * scale, y)
        assert math.isfinite(float(got)), name
        assert float(got) == pytest.approx(expected, abs=LOOSE), name
    np.testing.assert_allclose(cca(x * scale, y * scale).numpy(), cca(x, y).numpy(), atol=LOOSE)
    assert float(pwcca(x * scale, y)) == pytest.approx(float(pwcca(x, y)), abs=LOOSE)


def test_offset_dominated_float64_gives_the_value():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, dtype=torch.float64, generator=generator)
    y = x @ torch.randn(5, 5, dtype=torch.float64, generator=generator)
    assert float(svcca(1e7 + x, 1e7 + y, keep=1.0)) == pytest.approx(1.0, abs=LOOSE)
    np.testing.assert_allclose(cca(1e7 + x, y).numpy(), np.ones(5), atol=LOOSE)


@pytest.mark.parametrize("function", [cca, svcca, linear_cka, procrustes, r2cca])
def test_offset_dominated_float32_is_a_clear_error(function):
    # float32 resolves 1e7 to 1.0: unit noise on it is rounding-level variation, which must not pass for signal.
    generator = torch.Generator().manual_seed(0)
    x = 1e7 + torch.randn(1000, 5, generator=generator)
    other = torch.randn(1000, 3, generator=generator)
    with pytest.raises(ZeroVarianceError, match="rounding level .* subtract the offset"):
        function(x, other)


def test_numpy_integer_keep_is_accepted():
    x, y = (torch.from_numpy(a) for a in related())
    assert float(svcca(x, y, keep=np.int64(3))) == float(svcca(x, y, keep=3))
    assert svcca_details(x, y, keep=np.int32(2)).kept == (2, 2)
    assert float(svcca(x, y, keep=np.float64(0.9))) == float(svcca(x, y, keep=0.9))


def test_integer_keep_one_warns_and_float_keeps_all():
    x, y = (torch.from_numpy(a) for a in related())
    with pytest.warns(SimilarityWarning, match="keep=1 .*keep=1.0 to keep all"):
        details = svcca_details(x, y, keep=1)
    assert details.kept == (1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SimilarityWarning)
        assert svcca_details(x, y, keep=1.0).kept == (8, 6)
