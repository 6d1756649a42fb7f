"""Mutual k-NN, CKNNA, minibatch CKA and RSA against independent numpy/scipy references, invariances, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

from lightning_svcca import MinibatchCKA, ZeroVarianceError, cknna, linear_cka, minibatch_cka, mutual_knn, rsa
from lightning_svcca.measures._checks import SimilarityWarning

TOL = 1e-10


def _pair(n: int = 120, d1: int = 10, d2: int = 14, noise: float = 0.7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(d1, d2, generator=generator, dtype=torch.float64)
    return x, y + noise * torch.randn(n, d2, generator=generator, dtype=torch.float64)


def _rotation(d: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]


# --- independent references (numpy, written from the papers / the authors' code's steps) ---------------------------


def _np_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _np_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    a, b = _np_neighbours(x, k), _np_neighbours(y, k)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(x))]))


def _np_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    value = np.sum(kt * lt.T) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 * np.sum(kt @ lt) / (n - 2)
    return value / (n * (n - 3))


def _np_cknna(x: np.ndarray, y: np.ndarray, k: int) -> float:
    ux = x / np.linalg.norm(x, axis=1, keepdims=True)
    uy = y / np.linalg.norm(y, axis=1, keepdims=True)
    kx, ky = ux @ ux.T, uy @ uy.T
    n = len(x)

    def mask(neighbours: np.ndarray) -> np.ndarray:
        m = np.zeros((n, n))
        m[np.arange(n)[:, None], neighbours] = 1.0
        return m

    mx, my = mask(_np_neighbours(x, k)), mask(_np_neighbours(y, k))
    mutual = mx * my
    num = _np_hsic_unbiased(kx * mutual, ky * mutual)
    return num / np.sqrt(_np_hsic_unbiased(kx * mx, kx * mx) * _np_hsic_unbiased(ky * my, ky * my))


def _np_minibatch_cka(x: np.ndarray, y: np.ndarray, bounds: list[tuple[int, int]]) -> float:
    sums = np.zeros(3)
    for start, stop in bounds:
        kx, ky = x[start:stop] @ x[start:stop].T, y[start:stop] @ y[start:stop].T  # uncentred: HSIC_1 is shift-free
        sums += [_np_hsic_unbiased(kx, ky), _np_hsic_unbiased(kx, kx), _np_hsic_unbiased(ky, ky)]
    return sums[0] / np.sqrt(sums[1] * sums[2])


# --- mutual k-NN and CKNNA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 10, 119])
def test_mutual_knn_matches_numpy(k):
    x, y = _pair()
    assert float(mutual_knn(x, y, k=k)) == pytest.approx(_np_mutual_knn(x.numpy(), y.numpy(), k), abs=TOL)


@pytest.mark.parametrize("k", [1, 3, 10, 60])
def test_cknna_matches_the_reference_estimator(k):
    x, y = _pair()
    assert float(cknna(x, y, k=k)) == pytest.approx(_np_cknna(x.numpy(), y.numpy(), k), abs=1e-9)


def test_cknna_with_every_neighbour_is_debiased_cka_of_unit_rows():
    x, y = _pair(n=80)
    unit_x, unit_y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    expected = float(linear_cka(unit_x, unit_y, debiased=True))
    assert float(cknna(x, y, k=79)) == pytest.approx(expected, abs=1e-10)
    assert float(mutual_knn(x, y, k=79)) == 1.0


@pytest.mark.parametrize("measure", [mutual_knn, cknna])
def test_neighbour_measures_invariances(measure):
    x, y = _pair()
    value = float(measure(x, y, k=7))
    assert float(measure(x @ _rotation(10), 5.0 * y @ _rotation(14, 2), k=7)) == pytest.approx(value, abs=1e-9)
    assert float(measure(x[:, torch.randperm(10)], y, k=7)) == pytest.approx(value, abs=1e-9)
    order = torch.randperm(x.shape[0])
    assert float(measure(x[order], y[order], k=7)) == pytest.approx(value, abs=1e-9)
    # the reference estimator's 1^T K~ L~ 1 term is not symmetric for the (non-symmetric) k-NN masks
    assert float(measure(y, x, k=7)) == pytest.approx(value, abs=1e-9 if measure is mutual_knn else 1e-2)
    assert float(measure(x, 0.5 * x @ _rotation(10), k=7)) == pytest.approx(1.0, abs=1e-9)


def test_mutual_knn_of_unrelated_data_is_about_k_over_n():
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(600, 20, generator=generator), torch.randn(600, 20, generator=generator)
    assert float(mutual_knn(x, y, k=30)) == pytest.approx(30 / 599, abs=0.02)
    assert abs(float(cknna(x, y, k=30))) < 0.1


@pytest.mark.parametrize("k", [0, 120, -1])
def test_k_outside_its_range_names_the_fix(k):
    x, y = _pair()
    for measure in (mutual_knn, cknna):
        with pytest.raises(ValueError, match=r"k must be in \[1, n - 1\] = \[1, 119\].*lower k"):
            measure(x, y, k=k)


@pytest.mark.parametrize("k", [1.5, True, "3"])
def test_k_must_be_an_int(k):
    x, y = _pair()
    with pytest.raises(TypeError, match="k must be an int"):
        mutual_knn(x, y, k=k)


def test_neighbour_measures_refuse_degenerate_inputs():
    x, y = _pair(n=20)
    for measure in (mutual_knn, cknna):
        with pytest.raises(ZeroVarianceError, match="y has zero variance"):
            measure(x, torch.ones(20, 3), k=3)
        bad = x.clone()
        bad[4, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or Inf value.*row 4, column 2"):
            measure(bad, y, k=3)
        with pytest.raises(ValueError, match="same number of datapoints"):
            measure(x, y[:10], k=3)
    with pytest.raises(ValueError, match="at least 4 datapoints"):
        cknna(x[:3], y[:3], k=1)
    assert float(mutual_knn(x[:2], y[:2], k=1)) == 1.0


def test_cknna_constant_column_and_zero_row():
    """A constant column shifts every cosine (defined); a zero row is similar to nothing, as F.normalize gives."""
    x, y = _pair(n=50)
    shifted = torch.cat([x, torch.full((50, 1), 3.0, dtype=torch.float64)], dim=1)
    assert float(cknna(shifted, y, k=5)) == pytest.approx(_np_cknna(shifted.numpy(), y.numpy(), 5), abs=1e-9)
    zero = x.clone()
    zero[7] = 0.0
    value = float(mutual_knn(zero, y, k=5))
    assert 0.0 <= value <= 1.0


def test_cknna_without_self_alignment_is_zero_with_a_warning():
    """Four datapoints in the plane, k=2 (no ties): the masked kernel's unbiased HSIC with itself is -0.0115.

    Not a norm (the k-NN masks are not symmetric), so there is no ratio: 0, with a warning, rather than the -1 of
    the reference formula (or NaN when only one side is negative).
    """
    x = torch.tensor([[0.4852, -0.2521], [-0.3512, -0.6123], [-0.2173, 1.2601], [0.8759, 0.4444]], dtype=torch.float64)
    # the reference estimator divides two negative self-terms: -1 for a representation against itself
    assert _np_cknna(x.numpy(), x.numpy(), 2) == pytest.approx(-1.0)
    with pytest.warns(SimilarityWarning, match=r"no positive alignment with itself at k=2.*-0.01"):
        assert float(cknna(x, x, k=2)) == 0.0
    assert float(cknna(x, x, k=3)) == pytest.approx(1.0)


# --- minibatch CKA ---------------------------------------------------------------------------------------------------


def test_minibatch_cka_with_one_chunk_is_debiased_cka():
    x, y = _pair(n=100)
    expected = float(linear_cka(x, y, debiased=True))
    assert float(minibatch_cka(x, y, batch_size=100)) == pytest.approx(expected, abs=TOL)
    assert float(minibatch_cka(x, y, batch_size=1000)) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize(
    ("n", "batch_size", "bounds"), [(100, 25, None), (102, 25, [(0, 25), (25, 50), (50, 75), (75, 102)])]
)
def test_minibatch_cka_matches_numpy(n, batch_size, bounds):
    x, y = _pair(n=n)
    bounds = bounds or [(s, s + batch_size) for s in range(0, n, batch_size)]
    expected = _np_minibatch_cka(x.numpy() + 5.0, y.numpy(), bounds)
    assert float(minibatch_cka(x + 5.0, y, batch_size=batch_size)) == pytest.approx(expected, abs=TOL)


def test_streaming_equals_the_function_and_resets():
    x, y = _pair(n=200)
    metric = MinibatchCKA()
    for start in range(0, 200, 50):
        metric.update(x[start : start + 50], y[start : start + 50])
    assert metric.chunks == 4
    assert float(metric.compute()) == pytest.approx(float(minibatch_cka(x, y, batch_size=50)), abs=TOL)
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_minibatch_cka_invariances_and_range():
    x, y = _pair(n=160)
    value = float(minibatch_cka(x, y, batch_size=40))
    moved = float(minibatch_cka(3.0 * x @ _rotation(10) + 7.0, y @ _rotation(14, 2) - 1.0, batch_size=40))
    assert moved == pytest.approx(value, abs=1e-10)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        a, b = torch.randn(12, 30, generator=generator), torch.randn(12, 2, generator=generator)
        assert -1.0 <= float(minibatch_cka(a, b, batch_size=4)) <= 1.0


def test_minibatch_cka_of_float32_with_a_large_offset():
    """float32 inputs with a mean of 1000: PyTorch-Model-Compare's uncentred float32 kernels give NaN here."""
    x, y = _pair(n=512)
    expected = float(minibatch_cka(x, y, batch_size=128))
    shifted = float(minibatch_cka((x + 1e3).float(), (y - 1e3).float(), batch_size=128))
    assert shifted == pytest.approx(expected, abs=1e-5)


def test_minibatch_cka_is_never_nan():
    x, y = _pair(n=40)
    half_constant = x.clone()
    half_constant[:20] = 1.0  # no variance within the first chunk: it contributes 0, not NaN
    value = float(minibatch_cka(half_constant, y, batch_size=20))
    assert np.isfinite(value)
    with pytest.raises(ZeroVarianceError, match="x has zero variance.*within every chunk"):
        minibatch_cka(torch.ones(40, 3), y, batch_size=20)
    collinear = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    assert np.isfinite(float(minibatch_cka(collinear, collinear, batch_size=4)))


def test_minibatch_cka_refuses_bad_arguments():
    x, y = _pair(n=40)
    with pytest.raises(ValueError, match="batch_size must be an int >= 4"):
        minibatch_cka(x, y, batch_size=3)
    with pytest.raises(ValueError, match="at least 4 datapoints"):
        minibatch_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="at least 4 datapoints for the unbiased HSIC"):
        MinibatchCKA().update(x[:3], y[:3])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        minibatch_cka(bad, y)


# --- RSA -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["correlation", "cosine", "euclidean"])
@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_rsa_matches_scipy(distance, method):
    x, y = _pair(n=60)
    dx, dy = pdist(x.numpy(), distance), pdist(y.numpy(), distance)
    expected = (spearmanr if method == "spearman" else pearsonr)(dx, dy)[0]
    assert float(rsa(x, y, method=method, distance=distance)) == pytest.approx(expected, abs=1e-9)


def test_rsa_spearman_ties_as_scipy():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (40, 3), generator=generator).double()
    y = torch.randint(0, 3, (40, 2), generator=generator).double()
    dx, dy = pdist(x.numpy(), "euclidean"), pdist(y.numpy(), "euclidean")
    assert len(np.unique(dx)) < len(dx) / 10  # heavily tied
    expected = spearmanr(dx, dy)[0]
    assert float(rsa(x, y, distance="euclidean")) == pytest.approx(expected, abs=1e-12)


def test_rsa_invariances():
    x, y = _pair(n=50)
    for distance in ("cosine", "euclidean"):
        value = float(rsa(x, y, distance=distance))
        assert float(rsa(2.0 * x @ _rotation(10), y, distance=distance)) == pytest.approx(value, abs=1e-9)
    value = float(rsa(x, y))
    assert float(rsa(3.0 * x[:, torch.randperm(10)] + 2.0, y)) == pytest.approx(value, abs=1e-9)
    assert float(rsa(x + 1.0, y, distance="euclidean")) == pytest.approx(float(rsa(x, y, distance="euclidean")))
    order = torch.randperm(50)
    assert float(rsa(x[order], y[order])) == pytest.approx(value, abs=1e-9)


def test_rsa_refuses_degenerate_inputs():
    x, y = _pair(n=30)
    with pytest.raises(ZeroVarianceError, match="x has zero variance"):
        rsa(torch.ones(30, 4), y)
    with pytest.raises(ZeroVarianceError, match="RDM does not vary"):
        rsa(x[:, :1], y)  # correlation distance of one feature: every datapoint has no direction
    with pytest.raises(ValueError, match="at least 3 datapoints"):
        rsa(x[:2], y[:2])
    with pytest.raises(ValueError, match="method must be one of"):
        rsa(x, y, method="kendall")
    with pytest.raises(ValueError, match="distance must be one of"):
        rsa(x, y, distance="cityblock")


def test_minibatch_cka_of_tensors_that_track_gradients_is_their_value():
    """A similarity is no loss: inputs that track gradients (activations taken mid-training) give their value (the
    chunk buffers refused autograd's tensors with a raw RuntimeError)."""
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    assert float(minibatch_cka(x, y, batch_size=25)) == pytest.approx(float(minibatch_cka(x.detach(), y.detach(), 25)))
