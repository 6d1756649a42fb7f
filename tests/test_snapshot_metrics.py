"""The added metrics as snapshot metrics: the same values as the public functions on the raw activations."""

from __future__ import annotations

import pytest
import torch

from lightning_svcca.measures import linear_cka, procrustes, r2cca, rbf_cka
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
from lightning_svcca.pipeline.metrics import METRICS, cross_products, evaluate, measure, pair_for, snapshot_needs
from lightning_svcca.pipeline.snapshot import LocalCollective, build_snapshot

pytestmark = pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")

CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps
# Snapshot bases are float32: values agree with the float64 functions to a few float32 ulps times sqrt(rows).
STORAGE_TOL = 2e-5

PUBLIC = {
    "r2cca": lambda x, y: r2cca(x, y),
    "procrustes": lambda x, y: procrustes(x, y),
    "linear_cka_debiased": lambda x, y: linear_cka(x, y, debiased=True),
    "rbf_cka": lambda x, y: rbf_cka(x, y),
    "cca_heldout": lambda x, y: cca_heldout(x, y).mean(),
    "svcca_heldout": lambda x, y: svcca_heldout(x, y, keep=1.0),
    "pwcca_heldout": lambda x, y: pwcca_heldout(x, y),
}


def _data(n, d1, d2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=generator) * torch.linspace(3, 0.3, d1) + 2.0
    y = x[:, : min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=generator)
    return x, y + 0.8 * torch.randn(n, d2, generator=generator)


def _snapshots(x, y, metrics, keep=0.99):
    full_rank, with_right, _ = snapshot_needs(metrics)
    kwargs = dict(keep=keep, keep_by="singular_values", full_rank=full_rank, with_right=with_right, input_eps=EPS32)
    return (
        build_snapshot(x, LocalCollective(), name="x", **kwargs),
        build_snapshot(y, LocalCollective(), name="y", **kwargs),
    )


@pytest.mark.parametrize("metric", list(PUBLIC))
@pytest.mark.parametrize(("n", "d1", "d2"), [(160, 10, 12), (60, 80, 12)], ids=["gram", "svd"])
def test_snapshot_metric_matches_public_function(metric, n, d1, d2):
    x, y = _data(n, d1, d2)
    a, b = _snapshots(x, y, [metric], keep=1.0)
    pair = pair_for(metric, a, b)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    expected = float(PUBLIC[metric](x.double(), y.double()))
    assert measure(metric, pair, cross) == pytest.approx(expected, abs=STORAGE_TOL)


def test_evaluate_mixes_every_metric_with_a_shuffle():
    x, y = _data(150, 8, 9)
    a, b = _snapshots(x, y, METRICS)
    shuffle = torch.randperm(150, generator=torch.Generator().manual_seed(3))
    jobs = [(metric, pair_for(metric, a, b)) for metric in METRICS]
    jobs += [(metric, pair_for(metric, a, a, shuffle)) for metric in ("rbf_cka", "linear_cka_debiased", "cca_heldout")]
    values = evaluate(jobs, LocalCollective(), device=CPU)
    assert len(values) == len(jobs) and all(v == v for v in values)
    shuffled = dict(zip(("rbf_cka", "linear_cka_debiased", "cca_heldout"), values[len(METRICS) :], strict=True))
    xs = x.double()[shuffle]
    assert shuffled["rbf_cka"] == pytest.approx(float(rbf_cka(x.double(), xs)), abs=STORAGE_TOL)
    assert shuffled["linear_cka_debiased"] == pytest.approx(
        float(linear_cka(x.double(), xs, debiased=True)), abs=STORAGE_TOL
    )
    assert abs(shuffled["cca_heldout"]) < 0.15  # the noise baseline held out is near 0


@pytest.mark.parametrize(
    ("metrics", "needs"),
    [
        (["svcca"], (False, False, False)),
        (["svcca", "cca"], (True, False, False)),
        (["linear_cka"], (True, False, False)),
        (["procrustes", "rbf_cka", "r2cca", "linear_cka_debiased"], (True, False, False)),
        (["cca_heldout", "svcca_heldout"], (True, False, False)),
        (["pwcca"], (True, True, False)),
        (["svcca", "pwcca_heldout"], (True, True, False)),
        (["minibatch_cka"], (True, False, False)),  # centred kernels: translation-invariant
        (["mutual_knn"], (True, False, True)),
        (["svcca", "cknna", "rsa"], (True, False, True)),
    ],
)
def test_snapshot_needs(metrics, needs):
    assert snapshot_needs(metrics) == needs


def test_snapshot_needs_refuses_unknown_metrics():
    with pytest.raises(ValueError, match="unknown metric.*'kendall'"):
        snapshot_needs(["svcca", "kendall"])


def test_row_metrics_refuse_kept_only_snapshots():
    x, y = _data(100, 6, 6)
    a, b = _snapshots(x, y, ["svcca"], keep=0.5)
    pair = pair_for("rbf_cka", a, b)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    with pytest.raises(ValueError, match="rbf_cka needs full-rank snapshots"):
        measure("rbf_cka", pair, cross)
