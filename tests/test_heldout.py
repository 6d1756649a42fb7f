"""Tests of held-out CCA, SVCCA and PWCCA: unbiased on independent data, exact on related data, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_svcca.measures import DATAPOINTS_PER_DIRECTION, svcca
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout

pytestmark = pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")

HELDOUT = {
    "cca": lambda x, y, **kw: cca_heldout(x, y, **kw).mean(),
    "svcca": svcca_heldout,
    "pwcca": pwcca_heldout,
}


def _independent(d, seed):
    rng = np.random.default_rng(seed)
    n = DATAPOINTS_PER_DIRECTION * d
    return torch.from_numpy(rng.standard_normal((n, d))), torch.from_numpy(rng.standard_normal((n, d)) + 2.0)


@pytest.mark.parametrize("name", list(HELDOUT))
def test_independent_data_scores_near_zero_where_in_sample_does_not(name):
    x, y = _independent(40, seed=0)
    assert float(svcca(x, y, keep=1.0)) > 0.3  # the in-sample bias at 5 datapoints per direction
    assert abs(float(HELDOUT[name](x, y))) < 0.05


@pytest.mark.parametrize("name", list(HELDOUT))
def test_invertible_map_of_the_same_data_scores_one(name):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((200, 10)))
    y = x @ torch.from_numpy(rng.standard_normal((10, 10))) + 5.0
    assert float(HELDOUT[name](x, y)) == pytest.approx(1.0, abs=1e-6)
    assert float(HELDOUT[name](x, x)) == pytest.approx(1.0, abs=1e-6)


def test_shared_signal_is_found_on_held_out_data():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((400, 3))
    x = torch.from_numpy(np.hstack([z, rng.standard_normal((400, 5))]))
    y = torch.from_numpy(np.hstack([z @ rng.standard_normal((3, 3)), rng.standard_normal((400, 4))]))
    correlations = cca_heldout(x, y)
    assert correlations.shape == (7,)
    assert bool((correlations[:3] > 0.99).all())  # the shared latent
    assert float(correlations[3:].abs().max()) < 0.25  # noise directions: near 0 held out


def test_deterministic_per_seed_and_seed_matters():
    x, y = _independent(10, seed=3)
    first, again = cca_heldout(x, y, seed=7), cca_heldout(x, y, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, cca_heldout(x, y, seed=8))


def test_fixed_epsilon_and_grid():
    x, y = _independent(10, seed=4)
    plain = cca_heldout(x, y, epsilon=0.0)
    ridge = cca_heldout(x, y, epsilon=10.0)
    assert plain.shape == ridge.shape == (10,)
    assert not torch.allclose(plain, ridge)
    # a one-value grid is the same as that epsilon
    assert torch.equal(cca_heldout(x, y, epsilons=(10.0,)), ridge)


def test_svcca_heldout_keeps_directions_per_training_set():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((300, 6)) * np.array([10.0, 9.0, 8.0, 0.01, 0.01, 0.01]))
    weak = 0.01 * rng.standard_normal((300, 3))
    y = torch.cat([x[:, :3] @ torch.from_numpy(rng.standard_normal((3, 3))), torch.from_numpy(weak)], dim=1)
    # the three strong directions are kept and shared; the weak ones (independent noise) are dropped
    assert float(svcca_heldout(x, y, keep=0.9)) == pytest.approx(1.0, abs=1e-6)
    assert float(cca_heldout(x, y).mean()) < 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"folds": 1}, "folds must be an int >= 2"),
        ({"folds": 30}, "needs at least 120 datapoints"),
        ({"dev_fraction": 1.0}, "dev_fraction must be in"),
        ({"epsilon": -1.0}, "must be >= 0"),
        ({"epsilons": ()}, "must be >= 0"),
    ],
)
def test_bad_split_arguments(kwargs, match):
    x, y = _independent(4, seed=0)
    with pytest.raises(ValueError, match=match):
        cca_heldout(x, y, **kwargs)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same number of datapoints"):
        cca_heldout(torch.randn(50, 3), torch.randn(40, 3))
