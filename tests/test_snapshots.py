"""Tests of pipeline.snapshot and pipeline.store: snapshots agree with the public measures; the bounded store."""

from __future__ import annotations

import pytest
import torch

from lightning_svcca import ZeroVarianceError, cca, linear_cka, pwcca, svcca
from lightning_svcca.pipeline.metrics import cross_products, measure, pair_for
from lightning_svcca.pipeline.snapshot import LocalCollective, Snapshot, build_snapshot
from lightning_svcca.pipeline.store import SnapshotStore

pytestmark = pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")

CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps
# Bases are stored in float32: products of them carry errors of a few float32 ulps times sqrt(rows).
STORAGE_TOL = 1e-5


def _snapshot(rows: torch.Tensor, name: str = "layer", **overrides) -> Snapshot:
    arguments = dict(name=name, keep=0.99, keep_by="singular_values", full_rank=True, with_right=True, input_eps=EPS32)
    arguments.update(overrides)
    return build_snapshot(rows, LocalCollective(), **arguments)


def _pair(n: int, d1: int, d2: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two related float32 representations of ``n`` datapoints: y mixes a part of x with noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=generator) * torch.linspace(3, 0.2, d1)  # a decaying spectrum
    shared = x[:, : min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=generator)
    y = shared + 0.7 * torch.randn(n, d2, generator=generator) + 4.0  # offset: centring matters
    return x, y


# (n, d1, d2): Gram route on both sides, SVD route (n < d) on one side, and on both.
SHAPES = [(200, 10, 12), (40, 50, 12), (40, 45, 60)]
SHAPE_IDS = ["gram-gram", "svd-gram", "svd-svd"]


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES, ids=SHAPE_IDS)
def test_left_basis_is_orthonormal(n, d1, d2):
    x, y = _pair(n, d1, d2)
    for rows in (x, y):
        snapshot = _snapshot(rows)
        left = snapshot.left
        assert left.dtype == torch.float32 and left.shape == (n, snapshot.rank)
        gram = left.double().T @ left.double()
        torch.testing.assert_close(gram, torch.eye(snapshot.rank, dtype=torch.float64), rtol=0, atol=50 * EPS32)
        # orthogonal to the constant vector: the activations were centred
        assert left.double().sum(dim=0).abs().max() < 1e-4
        assert snapshot.singular_values.dtype == torch.float64
        assert bool((snapshot.singular_values[:-1] >= snapshot.singular_values[1:]).all())
        assert snapshot.n_features == rows.shape[1] and snapshot.n_datapoints == n


def _public(metric: str, x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    if metric == "svcca":
        return float(svcca(x, y, keep=0.99))
    if metric == "cca":
        return float(cca(x, y).mean())
    if metric == "pwcca":
        return float(pwcca(x, y))
    return float(linear_cka(x, y))


@pytest.mark.parametrize("metric", ["svcca", "cca", "pwcca", "linear_cka"])
@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES, ids=SHAPE_IDS)
def test_snapshot_measures_match_the_public_functions(metric, n, d1, d2):
    x, y = _pair(n, d1, d2)
    a, b = _snapshot(x), _snapshot(y)
    pair = pair_for(metric, a, b)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    assert measure(metric, pair, cross) == pytest.approx(_public(metric, x, y), abs=STORAGE_TOL)


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES, ids=SHAPE_IDS)
def test_svcca_from_kept_directions_only(n, d1, d2):
    x, y = _pair(n, d1, d2)
    a, b = _snapshot(x, full_rank=False), _snapshot(y, full_rank=False)
    pair = pair_for("svcca", a, b)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    assert measure("svcca", pair, cross) == pytest.approx(_public("svcca", x, y), abs=STORAGE_TOL)


@pytest.mark.parametrize(("keep", "keep_by"), [(0.5, "singular_values"), (0.9, "variance"), (3, "singular_values")])
def test_kept_count_follows_keep(keep, keep_by):
    x, y = _pair(300, 10, 12)
    a, b = _snapshot(x, keep=keep, keep_by=keep_by), _snapshot(y, keep=keep, keep_by=keep_by)
    pair = pair_for("svcca", a, b)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    expected = float(svcca(x.double(), y.double(), keep=keep, keep_by=keep_by))
    assert measure("svcca", pair, cross) == pytest.approx(expected, abs=STORAGE_TOL)
    if isinstance(keep, int):
        assert a.kept == keep


def test_cross_products_of_several_pairs_and_a_shuffle():
    x, y = _pair(100, 6, 7)
    a, b = _snapshot(x), _snapshot(y)
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    pairs = [pair_for("cca", a, b), pair_for("cca", b, a), pair_for("cca", a, a, shuffle)]
    products = cross_products(pairs, LocalCollective(), device=CPU)
    torch.testing.assert_close(products[0], products[1].T)
    expected = float(cca(x.double(), x[shuffle].double()).mean())
    assert measure("cca", pairs[2], products[2]) == pytest.approx(expected, abs=STORAGE_TOL)
    assert cross_products([], LocalCollective(), device=CPU) == []


def test_cross_products_refuse_different_datapoints():
    a, b = _snapshot(_pair(50, 4, 4)[0]), _snapshot(_pair(60, 4, 4)[0])
    with pytest.raises(ValueError, match="50 and 60 datapoints"):
        cross_products([pair_for("cca", a, b)], LocalCollective(), device=CPU)


def test_unknown_metric_raises():
    a = _snapshot(_pair(50, 4, 4)[0])
    pair = pair_for("linear_cka", a, a)
    (cross,) = cross_products([pair], LocalCollective(), device=CPU)
    with pytest.raises(ValueError, match="unknown metric 'kendall'"):
        measure("kendall", pair, cross)


@pytest.mark.parametrize(("n", "d"), [(30, 5), (5, 30)], ids=["gram", "svd"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_raise_naming_the_layer(n, d, bad):
    rows = torch.randn(n, d)
    rows[2, 3] = bad
    with pytest.raises(ValueError, match="layer 'encoder.block3'.*NaN or Inf"):
        _snapshot(rows, name="encoder.block3")


@pytest.mark.parametrize(("n", "d"), [(30, 5), (5, 30)], ids=["gram", "svd"])
@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_layer_raises_zero_variance(n, d, value):
    with pytest.raises(ZeroVarianceError, match="layer 'dead'.*zero variance"):
        _snapshot(torch.full((n, d), value), name="dead")


def test_too_few_datapoints_raise():
    with pytest.raises(ValueError, match="at least 2"):
        _snapshot(torch.randn(1, 3))


@pytest.mark.parametrize(("n", "d"), [(200, 12), (30, 50)], ids=["gram", "svd"])
def test_full_rank_false_stores_only_the_kept_directions(n, d):
    rows = _pair(n, d, 2)[0]
    full = _snapshot(rows)
    kept = _snapshot(rows, full_rank=False, keep=0.6)
    assert kept.kept < kept.rank == full.rank
    assert kept.left.shape == (n, kept.kept)
    assert kept.singular_values.shape == (kept.kept,)
    assert kept.right.shape == (d, kept.kept)
    torch.testing.assert_close(kept.singular_values, full.singular_values[: kept.kept])


@pytest.mark.parametrize("with_right", [True, False])
def test_with_right_controls_the_right_vectors(with_right):
    rows = _pair(100, 7, 2)[0]
    snapshot = _snapshot(rows, with_right=with_right)
    if not with_right:
        assert snapshot.right is None
        return
    assert snapshot.right.shape == (7, snapshot.rank) and snapshot.right.dtype == torch.float32
    # U diag(s) V^T reconstructs the centred rows
    centred = rows.double() - rows.double().mean(dim=0)
    rebuilt = snapshot.left.double() @ torch.diag(snapshot.singular_values) @ snapshot.right.double().T
    torch.testing.assert_close(rebuilt, centred, rtol=0, atol=1e-4)


def test_nbytes_and_state_round_trip():
    snapshot = _snapshot(_pair(50, 6, 2)[0])
    assert snapshot.nbytes == 50 * 6 * 4 + 6 * 8 + 6 * 6 * 4 + 2 * 7 * 8  # basis, spectrum, right, affine part
    again = Snapshot.from_state(snapshot.to_state())
    _assert_same(again, snapshot)
    assert torch.equal(again.affine, snapshot.affine)
    older = {key: value for key, value in snapshot.to_state().items() if key != "affine"}
    assert Snapshot.from_state(older).affine is None  # snapshots written before the affine part still load


# ----------------------------------------------------------------------------------------------------------------
# SnapshotStore
# ----------------------------------------------------------------------------------------------------------------


def _assert_same(a: Snapshot, b: Snapshot) -> None:
    assert torch.equal(a.left, b.left)
    assert torch.equal(a.singular_values, b.singular_values)
    assert (a.right is None) == (b.right is None)
    if a.right is not None:
        assert torch.equal(a.right, b.right)
    assert (a.kept, a.rank, a.n_features) == (b.kept, b.rank, b.n_features)


@pytest.fixture
def snapshots() -> dict[tuple[str, str], Snapshot]:
    """Six snapshots of 2 layers x 3 epochs, each 100 x 5 (2000 + 40 + 100 bytes)."""
    generator = torch.Generator().manual_seed(0)
    return {
        (layer, str(epoch)): _snapshot(torch.randn(100, 5, generator=generator), name=layer)
        for epoch in range(3)
        for layer in ("conv1", "fc")
    }


def test_store_put_get_discard(snapshots):
    store = SnapshotStore(None)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
    assert set(store.keys()) == set(snapshots)
    assert ("fc", "1") in store and ("fc", "9") not in store
    assert store.get(("fc", "1")) is snapshots[("fc", "1")]
    store.put(("fc", "1"), snapshots[("conv1", "2")])  # replace
    assert store.get(("fc", "1")) is snapshots[("conv1", "2")]
    store.discard(("fc", "1"))
    store.discard(("fc", "1"))  # twice is fine
    assert ("fc", "1") not in store
    with pytest.raises(KeyError):
        store.get(("fc", "1"))
    assert store.memory_bytes == sum(s.nbytes for s in snapshots.values()) - snapshots[("fc", "1")].nbytes
    assert store.spill_dir is None


def test_store_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="max_snapshot_bytes must be >= 0"):
        SnapshotStore(-1)


def test_store_spills_beyond_the_budget(snapshots):
    one = next(iter(snapshots.values())).nbytes
    budget = 2 * one + 10
    store = SnapshotStore(budget)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
        assert store.memory_bytes <= budget
    spill = store.spill_dir
    files = sorted(spill.glob("*.pt"))
    assert len(files) == 4  # two of six stay in memory
    assert set(store.keys()) == set(snapshots)
    for key, snapshot in snapshots.items():
        _assert_same(store.get(key), snapshot)
        assert store.memory_bytes <= budget
    # discarding a spilled snapshot deletes its (temporary) file
    store.discard(("conv1", "0"))
    assert len(list(spill.glob("*.pt"))) == 3
    store.close()
    assert not spill.exists()
    assert store.spill_dir is None


def test_store_spills_everything_with_a_zero_budget(snapshots):
    store = SnapshotStore(0)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
    assert store.memory_bytes == 0
    assert len(list(store.spill_dir.glob("*.pt"))) == len(snapshots)
    _assert_same(store.get(("fc", "2")), snapshots[("fc", "2")])
    store.close()


def test_store_evicts_the_least_recently_used(snapshots):
    one = next(iter(snapshots.values())).nbytes
    store = SnapshotStore(2 * one)
    store.put(("a", "0"), snapshots[("fc", "0")])
    store.put(("a", "1"), snapshots[("fc", "1")])
    store.get(("a", "0"))  # now a/1 is the least recently used
    store.put(("a", "2"), snapshots[("fc", "2")])
    assert store.get(("a", "0")) is snapshots[("fc", "0")]  # still in memory: the same object
    assert store.get(("a", "1")) is not snapshots[("fc", "1")]  # loaded from its file
    _assert_same(store.get(("a", "1")), snapshots[("fc", "1")])
    store.close()


@pytest.mark.parametrize("budget_snapshots", [None, 1])
def test_store_state_dict_round_trip(snapshots, budget_snapshots):
    one = next(iter(snapshots.values())).nbytes
    budget = None if budget_snapshots is None else budget_snapshots * one
    store = SnapshotStore(budget)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
    state = store.state_dict()
    assert set(state) == {f"{layer}@{tag}" for layer, tag in snapshots}
    assert all(isinstance(value, dict) and set(value) >= {"left", "kept"} for value in state.values())
    restored = SnapshotStore(None)
    restored.load_state_dict(state)
    assert set(restored.keys()) == set(snapshots)
    for key, snapshot in snapshots.items():
        _assert_same(restored.get(key), snapshot)
    store.close()


def test_store_load_state_dict_into_itself(snapshots):
    one = next(iter(snapshots.values())).nbytes
    store = SnapshotStore(one)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
    store.load_state_dict(store.state_dict())
    for key, snapshot in snapshots.items():
        _assert_same(store.get(key), snapshot)
    store.close()


def test_store_state_dict_keys_with_at_signs_in_layer_names(snapshots):
    store = SnapshotStore(None)
    store.put(("blocks@2.fc", "3"), snapshots[("fc", "0")])
    restored = SnapshotStore(None)
    restored.load_state_dict(store.state_dict())
    assert restored.keys() == [("blocks@2.fc", "3")]


def test_store_close_without_spill_is_harmless(snapshots):
    store = SnapshotStore(None)
    store.put(("fc", "0"), snapshots[("fc", "0")])
    store.close()
    store.close()
    assert store.get(("fc", "0")) is snapshots[("fc", "0")]


@pytest.mark.parametrize("budget_snapshots", [None, 0, 2])
def test_persistent_store_checkpoints_file_names_and_keeps_its_files(tmp_path, snapshots, budget_snapshots):
    one = next(iter(snapshots.values())).nbytes
    store = SnapshotStore(None if budget_snapshots is None else budget_snapshots * one)
    store.put(("fc", "0"), snapshots[("fc", "0")])  # before it knows its folder: written there on persist_to
    store.persist_to(tmp_path / "run")
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
    state = store.state_dict()
    assert state.pop("") == {"folder": str(tmp_path / "run")}
    assert all(set(entry) == {"name"} for entry in state.values())  # a few bytes per snapshot, however large
    state[""] = {"folder": str(tmp_path / "run")}
    assert len(list((tmp_path / "run").glob("*.pt"))) == len(snapshots)
    store.discard(("fc", "1"))  # forgotten, but its file stays: an older checkpoint may need it
    store.close()
    assert len(list((tmp_path / "run").glob("*.pt"))) == len(snapshots)
    restored = SnapshotStore(None)
    assert restored.load_state_dict(state) == []
    for key, snapshot in snapshots.items():
        _assert_same(restored.get(key), snapshot)
    # a checkpoint whose files are gone loads what is left and names what is missing
    next((tmp_path / "run").glob("conv1_2-*.pt")).unlink()
    again = SnapshotStore(None)
    assert again.load_state_dict(state) == ["conv1@2"]
    assert set(again.keys()) == set(snapshots) - {("conv1", "2")}


def test_persistent_store_has_no_leftover_temporary_files(tmp_path, snapshots):
    store = SnapshotStore(None, tmp_path)
    for key, snapshot in snapshots.items():
        store.put(key, snapshot)
        store.put(key, snapshot)  # rewritten in place
    assert not list(tmp_path.glob("*.partial"))
    assert len(list(tmp_path.glob("*.pt"))) == len(snapshots)


def test_an_alias_shares_the_snapshot_and_its_file(tmp_path):
    rows = torch.randn(200, 6, dtype=torch.float64)
    snapshot = _snapshot(rows)
    for directory in (None, tmp_path):
        store = SnapshotStore(max_bytes=None, directory=directory)
        store.put(("layer", "3"), snapshot)
        store.alias(("layer", "4"), ("layer", "3"))
        assert store.get(("layer", "4")) is snapshot
        assert store.memory_bytes == snapshot.nbytes  # counted once
        if directory is not None:
            assert len(set(tmp_path.iterdir())) == 1
            assert store.state_dict()["layer@4"] == store.state_dict()["layer@3"]
        store.discard(("layer", "3"))
        assert store.get(("layer", "4")) is snapshot
