"""mutual_knn, cknna, minibatch_cka and rsa from stored snapshots: the public functions' values on the raw
activations, through the affine part the snapshots keep; calibration; compare_models and the CLI."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_svcca import cknna, compare_models, cross_layer_similarity, minibatch_cka, mutual_knn, rsa
from lightning_svcca.pipeline.calibration import calibrate, calibrated_rows
from lightning_svcca.pipeline.comparisons import row
from lightning_svcca.pipeline.metrics import evaluate, pair_for, snapshot_needs
from lightning_svcca.pipeline.sample_metrics import SAMPLE_METRICS, feature_centred_gram, uncentred_gram
from lightning_svcca.pipeline.snapshot import LocalCollective, Snapshot, build_snapshot

CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps
STORAGE_TOL = 2e-5  # float32 bases

PUBLIC = {
    "mutual_knn": lambda x, y: mutual_knn(x, y, k=10),
    "cknna": lambda x, y: cknna(x, y, k=10),
    "minibatch_cka": lambda x, y: minibatch_cka(x, y, batch_size=256),
    "rsa": lambda x, y: rsa(x, y),
}


def _data(n, d1, d2, seed=0):
    """ReLU activations with a large mean: cosine and correlation distances depend on what centring removes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(n, d1, generator=generator) * torch.linspace(3, 0.3, d1) + 1.0)
    y = x[:, : min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=generator)
    return x, torch.relu(y + 0.8 * torch.randn(n, d2, generator=generator)) + 2.0


def _snapshot(rows, metrics=SAMPLE_METRICS):
    full_rank, with_right, with_affine = snapshot_needs(metrics)
    return build_snapshot(
        rows,
        LocalCollective(),
        name="layer",
        keep=0.99,
        keep_by="singular_values",
        full_rank=full_rank,
        with_right=with_right,
        input_eps=EPS32,
        with_affine=with_affine,
    )


@pytest.mark.parametrize(("n", "d1", "d2"), [(600, 10, 12), (60, 80, 12)], ids=["gram", "svd"])
def test_snapshot_grams_are_the_raw_grams(n, d1, d2):
    x, _ = _data(n, d1, d2)
    snapshot = _snapshot(x)
    rows = snapshot.left.double() * snapshot.singular_values
    raw = x.double()
    scale = float((raw @ raw.T).abs().max())
    torch.testing.assert_close(uncentred_gram(snapshot, rows), raw @ raw.T, rtol=0, atol=STORAGE_TOL * scale)
    by_features = raw - raw.mean(dim=1, keepdim=True)
    torch.testing.assert_close(
        feature_centred_gram(snapshot, rows), by_features @ by_features.T, rtol=0, atol=STORAGE_TOL * scale
    )


@pytest.mark.parametrize("metric", SAMPLE_METRICS)
@pytest.mark.parametrize(("n", "d1", "d2"), [(600, 10, 12), (60, 80, 12)], ids=["gram", "svd"])
def test_snapshot_metric_matches_public_function(metric, n, d1, d2):
    x, y = _data(n, d1, d2)
    a, b = _snapshot(x), _snapshot(y)
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    values = evaluate(
        [(metric, pair_for(metric, a, b)), (metric, pair_for(metric, a, a, shuffle))], LocalCollective(), device=CPU
    )
    xd, yd = x.double(), y.double()
    assert values[0] == pytest.approx(float(PUBLIC[metric](xd, yd)), abs=STORAGE_TOL)
    assert values[1] == pytest.approx(float(PUBLIC[metric](xd, xd[shuffle])), abs=STORAGE_TOL)


def test_snapshots_without_the_affine_part_say_so():
    x, y = _data(100, 6, 6)
    old = Snapshot.from_state({**_snapshot(x).to_state(), "affine": None})
    pair = pair_for("mutual_knn", old, _snapshot(y))
    with pytest.raises(ValueError, match="stored before snapshots kept their mean.*new run"):
        evaluate([("mutual_knn", pair)], LocalCollective(), device=CPU)
    # minibatch CKA is translation-invariant: it needs only the centred rows
    (value,) = evaluate(
        [("minibatch_cka", pair_for("minibatch_cka", old, _snapshot(y)))], LocalCollective(), device=CPU
    )
    assert math.isfinite(value)


def test_an_undefined_value_is_dropped_not_raised():
    """One feature: every datapoint has no direction across features, so the correlation RDM is constant."""
    x = torch.randn(50, 1, generator=torch.Generator().manual_seed(0))
    a = _snapshot(x)
    (value,) = evaluate([("rsa", pair_for("rsa", a, a))], LocalCollective(), device=CPU)
    assert math.isnan(value)


def test_calibration():
    assert calibrate(0.7, 0.4) == pytest.approx(0.5)
    assert calibrate(0.4, 0.4) == 0.0 and calibrate(1.0, 0.4) == 1.0 and calibrate(0.2, 0.6) == pytest.approx(-1.0)
    assert calibrate(0.9, 1.0) is None
    rows = [
        row(1, 10, "fc1", "previous", "cknna", 0.8),
        row(1, 10, "fc1", "baseline", "cknna", 0.2),
        row(1, 10, "fc1", "dims", "svcca", 5.0),
        row(1, 10, "fc2", "previous", "cknna", 0.9),  # no baseline for fc2: no calibrated row
    ]
    (calibrated,) = calibrated_rows(rows)
    assert calibrated["metric"] == "cknna_calibrated" and calibrated["reference"] == "previous"
    assert calibrated["value"] == pytest.approx(0.75)


class _Net(nn.Sequential):
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())


def test_compare_models_and_cross_layer_maps_with_the_new_metrics():
    probe = torch.randn(120, 8, generator=torch.Generator().manual_seed(2))
    result = compare_models(
        _Net(0), _Net(1), probe, layers=["1", "3"], metrics=list(SAMPLE_METRICS), cross_layer_metric="cknna"
    )
    text = str(result)
    for metric in SAMPLE_METRICS:
        assert metric in text
    net = _Net(0)
    with torch.no_grad():
        a = {"1": net[1](net[0](probe)), "3": net(probe)}
    for metric in SAMPLE_METRICS:
        layer_map = cross_layer_similarity(a, a, metric)
        assert torch.allclose(layer_map.values.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-9), metric
        snapshots = {name: _snapshot(rows) for name, rows in a.items()}
        from_snapshots = cross_layer_similarity(snapshots, snapshots, metric)
        torch.testing.assert_close(from_snapshots.values, layer_map.values, rtol=0, atol=STORAGE_TOL)


class CliNet(nn.Sequential):
    """A model the CLI can build without arguments."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12))


def test_cli_compare_with_the_new_metrics(tmp_path, capsys):
    from lightning_svcca.cli.main import main

    torch.manual_seed(0)
    torch.save(CliNet().state_dict(), tmp_path / "a.pt")
    torch.save(CliNet().state_dict(), tmp_path / "b.pt")
    torch.save(torch.randn(100, 8), tmp_path / "probe.pt")
    argv = ["compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--model", f"{__name__}:CliNet"]
    argv += ["--probe", str(tmp_path / "probe.pt"), "--metrics", *SAMPLE_METRICS, "--cross-layer-metric", "mutual_knn"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in (*SAMPLE_METRICS, "cross-layer mutual_knn"):
        assert text in out


def test_resuming_snapshots_without_the_affine_part_restarts_comparisons():
    """A run whose metrics need no Snapshot.affine stores none (as did checkpoints from before it existed): resumed
    with cosine or correlation metrics, its snapshots cannot be used; resumed the other way round, they can."""
    from lightning_svcca import SVCCAMonitor, SVCCAMonitorWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    probe = torch.randn(40, 4)
    first = SVCCAMonitor(model, probe=probe, layers=["0", "2"], metrics=["svcca", "linear_cka"])
    first.start()
    first.measure(epoch=1, step=1)
    state = first.state_dict()
    assert all(value["affine"] is None for value in state["snapshots"].values())
    with_mean = SVCCAMonitor(model, probe=probe, layers=["0", "2"], metrics=["rsa"])
    with_mean.start()
    kept = SVCCAMonitor(model, probe=probe, layers=["0", "2"], metrics=["linear_cka"])
    kept.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVCCAMonitorWarning)
        kept.load_state_dict(with_mean.state_dict())  # more than linear_cka needs: kept
    assert kept.store.keys()
    again = SVCCAMonitor(model, probe=probe, layers=["0", "2"], metrics=["linear_cka", "cknna"])
    again.start()
    with pytest.warns(SVCCAMonitorWarning, match="keep the layer's mean.*earlier snapshots are dropped"):
        again.load_state_dict(state)
    again.measure(epoch=2, step=2)
    again.measure(epoch=3, step=3)
    assert any(r["metric"] == "cknna" and r["reference"] == "previous" and r["epoch"] == 3 for r in again.history)
