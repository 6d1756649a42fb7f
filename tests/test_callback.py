"""End-to-end tests of SVCCACallback on real (tiny) Trainer runs over sklearn digits and Lightning's BoringModel."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.output.reporting import HISTORY_COLUMNS, read_history_csv
from lightning_svcca.pipeline.probe import probe_indices

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning_svcca.integrations.callback.SVCCAMonitorWarning"),
    pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

LAYERS = ["relu1", "relu2", "fc1", "fc2"]
PROBE = slice(1000, 1064)  # 64 digits outside the training and validation sets
SMALL = dict(max_datapoints=256, probe_batch_size=32)  # 4 positions per sample for conv layers


def _epochs(history, reference=None, layer=None, metric="svcca"):
    return sorted(
        {
            row["epoch"]
            for row in history
            if (reference is None or row["reference"] == reference)
            and (layer is None or row["layer"] == layer)
            and row["metric"] == metric
        }
    )


def _values(history, reference, layer, metric="svcca"):
    return {
        row["epoch"]: row["value"]
        for row in history
        if row["reference"] == reference and row["layer"] == layer and row["metric"] == metric
    }


def _no_hooks(model: nn.Module) -> bool:
    return all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard, CSV and history: one run shared by several tests
# ----------------------------------------------------------------------------------------------------------------

TB_EPOCHS = 2
TB_STEPS_PER_EPOCH = 2


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, digits, digits_loaders, digits_cnn):
    tmp_path = tmp_path_factory.mktemp("tensorboard")
    x, _ = digits
    train, val = digits_loaders
    torch.manual_seed(0)
    model = digits_cnn()
    callback = SVCCACallback(
        probe=x[PROBE],
        layers=LAYERS,
        reference=("previous", "initial", "final"),
        metrics=("svcca", "linear_cka"),
        **SMALL,
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=TB_EPOCHS,
        limit_train_batches=TB_STEPS_PER_EPOCH,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(model, train, val)
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return trainer, model, callback, events


@pytest.mark.parametrize("metric", ["svcca", "linear_cka"])
@pytest.mark.parametrize("layer", LAYERS)
def test_tensorboard_scalar_tags_and_steps(tensorboard_run, metric, layer):
    _, _, _, events = tensorboard_run
    scalars = set(events.Tags()["scalars"])
    every_epoch = [TB_STEPS_PER_EPOCH * epoch for epoch in range(TB_EPOCHS + 1)]  # logged at the global step
    expected = {
        f"{metric}/previous/{layer}": every_epoch[1:],
        f"{metric}/initial/{layer}": every_epoch[1:],
        f"{metric}/final/{layer}": every_epoch,
        f"{metric}/baseline/{layer}": every_epoch,
        f"svcca/dims/{layer}": every_epoch,
    }
    for name, steps in expected.items():
        assert name in scalars, name
        assert [event.step for event in events.Scalars(name)] == steps, name
    finals = [event.value for event in events.Scalars(f"{metric}/final/{layer}")]
    assert finals[-1] == pytest.approx(1.0, abs=1e-6)  # the last epoch against itself
    assert all(0.0 <= value <= 1.0 + 1e-6 for value in finals)


def test_tensorboard_scalars_match_the_history(tensorboard_run):
    _, _, callback, events = tensorboard_run
    for row in callback.history:
        name = f"{row['metric']}/{row['reference']}/{row['layer']}"
        logged = {event.step: event.value for event in events.Scalars(name)}
        assert row["step"] == TB_STEPS_PER_EPOCH * row["epoch"]
        assert logged[row["step"]] == pytest.approx(row["value"], rel=1e-6, abs=1e-7), (name, row["epoch"])


def test_tensorboard_images_and_layout(tensorboard_run):
    _, _, _, events = tensorboard_run
    images = set(events.Tags()["images"])
    assert {"svcca/final/heatmap", "svcca/previous/heatmap", "linear_cka/initial/heatmap"} <= images
    final_steps = [event.step for event in events.Images("svcca/final/heatmap")]
    steps = [TB_STEPS_PER_EPOCH * epoch for epoch in range(TB_EPOCHS + 1)]
    assert final_steps[-1] == steps[-1] and set(final_steps) <= set(steps)
    assert len(final_steps) == len(set(final_steps))  # one picture per step
    assert "custom_scalars__config__" in events.Tags()["tensors"]


@pytest.mark.parametrize("share", [1.0, 0.01])
def test_heatmaps_keep_to_their_time_share(tmp_path, digits, digits_loaders, digits_cnn, share):
    """Every measurement draws at share 1.0; at 1% of a tiny model's fit most wait, but each heatmap's last
    state is drawn at the end and the scalars stay complete."""
    x, _ = digits
    torch.manual_seed(0)
    callback = SVCCACallback(probe=x[PROBE], layers=LAYERS, reference=("previous",), heatmap_time_share=share, **SMALL)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=6,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(digits_cnn(), digits_loaders[0])
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    steps = [event.step for event in events.Images("svcca/previous/heatmap")]
    assert steps[-1] == 12 and len(steps) == len(set(steps))
    if share == 1.0:
        assert steps == [2 * epoch for epoch in range(1, 7)]
    else:
        assert len(steps) < 6
    assert [event.step for event in events.Scalars(f"svcca/previous/{LAYERS[0]}")] == [2 * e for e in range(1, 7)]


def test_heatmap_time_share_out_of_range_fails_clearly():
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"heatmap_time_share must be in \(0, 1\]"):
            SVCCACallback(heatmap_time_share=share)


def test_history_csv_matches_the_history(tensorboard_run):
    trainer, _, callback, _ = tensorboard_run
    path = trainer.log_dir + "/svcca_history.csv"
    with open(path) as handle:
        assert handle.readline().strip() == ",".join(HISTORY_COLUMNS)
    rows = read_history_csv(path)
    assert len(rows) == len(callback.history)
    for written, kept in zip(rows, callback.history, strict=True):
        assert written.keys() == kept.keys()
        assert {k: v for k, v in written.items() if k != "value"} == {k: v for k, v in kept.items() if k != "value"}
        assert written["value"] == pytest.approx(kept["value"], rel=1e-12)


def test_history_epochs_and_rows(tensorboard_run):
    _, model, callback, _ = tensorboard_run
    history = callback.history
    assert all(set(row) == set(HISTORY_COLUMNS) for row in history)
    assert callback.layers == LAYERS
    assert _epochs(history) == list(range(TB_EPOCHS + 1))
    assert _epochs(history, "previous") == list(range(1, TB_EPOCHS + 1))
    assert _epochs(history, "final") == list(range(TB_EPOCHS + 1))
    # one row per (epoch, layer, reference, metric)
    keys = Counter((row["epoch"], row["layer"], row["reference"], row["metric"]) for row in history)
    assert max(keys.values()) == 1
    for layer in LAYERS:
        dims = _values(history, "dims", layer)
        assert all(value == int(value) and value >= 1 for value in dims.values())
        # "previous" at epoch 1 and "initial" at epoch 1 compare the same two snapshots
        assert _values(history, "previous", layer)[1] == pytest.approx(_values(history, "initial", layer)[1])
    assert _no_hooks(model)


# ----------------------------------------------------------------------------------------------------------------
# Scheduling
# ----------------------------------------------------------------------------------------------------------------


def test_every_n_epochs_and_no_logger(make_trainer, tmp_path, digits, digits_loaders, digits_cnn):
    x, _ = digits
    callback = SVCCACallback(
        probe=x[PROBE], layers=["fc1", "fc2"], reference=("previous", "final"), every_n_epochs=2, **SMALL
    )
    trainer = make_trainer([callback], max_epochs=5, limit_train_batches=1, logger=False, limit_val_batches=0)
    trainer.fit(digits_cnn(), digits_loaders[0])
    assert _epochs(callback.history) == [0, 2, 4, 5]
    assert _epochs(callback.history, "previous") == [2, 4, 5]
    assert _epochs(callback.history, "final") == [0, 2, 4, 5]
    # "previous" means the last measured epoch: epoch 5 against epoch 4
    assert callback.monitor.measured == [0, 2, 4, 5]
    # without a logger the history file goes to the default_root_dir
    assert read_history_csv(tmp_path / "svcca_history.csv") == callback.history


class _Watched(SVCCACallback):
    """Records, around each measurement, what the measurement must leave alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visits = []

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        measure = self.monitor._measure

        def watched(epoch, step, **options):
            return self._visit(trainer, pl_module, epoch, lambda: measure(epoch, step, **options))

        self.monitor._measure = watched

    def _visit(self, trainer, pl_module, epoch, measure):
        flags = {name: module.training for name, module in pl_module.named_modules()}
        state = {name: value.clone() for name, value in pl_module.state_dict().items()}
        rng = torch.get_rng_state()
        # two probes of the same weights, dropout and BatchNorm in the model
        capture = self.monitor.snapshots.capture
        device = next(pl_module.parameters()).device
        first = capture.record(pl_module, device)
        second = capture.record(pl_module, device)
        identical = all(torch.equal(first.activations[k], second.activations[k]) for k in first.activations)
        layers = self.monitor.snapshots.settle_layer_order(first.order)
        snapshots = [capture.snapshots(rec, layers, epoch, device, label="test") for rec in (first, second)]
        identical_snapshots = all(
            torch.equal(snapshots[0][layer].left, snapshots[1][layer].left)
            and torch.equal(snapshots[0][layer].singular_values, snapshots[1][layer].singular_values)
            for layer in snapshots[0]
        )
        rows = measure()
        self.visits.append(
            {
                "epoch": epoch,
                "global_step": trainer.global_step,
                "was_training": flags[""],
                "flags_kept": flags == {name: module.training for name, module in pl_module.named_modules()},
                "state_kept": all(torch.equal(v, pl_module.state_dict()[k]) for k, v in state.items()),
                "rng_kept": torch.equal(rng, torch.get_rng_state()),
                "identical_activations": identical and bool(first.activations),
                "identical_snapshots": identical_snapshots and len(snapshots[0]) == len(layers),
                "hooks_left": not _no_hooks(pl_module),
            }
        )
        return rows


def test_measurements_leave_the_model_unchanged(make_trainer, digits, digits_loaders, digits_cnn):
    x, _ = digits
    callback = _Watched(probe=x[PROBE], layers=LAYERS, **SMALL)
    model = digits_cnn()
    model.bn1.eval()  # a module in eval mode inside a training model: its flag must survive too
    trainer = make_trainer([callback], max_epochs=2, limit_train_batches=3, logger=False)
    trainer.fit(model, digits_loaders[0], digits_loaders[1])
    # epoch 0 before any step, epoch k after k epochs of 3 batches, measured after the last batch
    assert [(visit["epoch"], visit["global_step"]) for visit in callback.visits] == [(0, 0), (1, 3), (2, 6)]
    assert [visit["was_training"] for visit in callback.visits] == [True, True, True]
    for visit in callback.visits:
        assert visit["flags_kept"], visit
        assert visit["state_kept"], visit  # weights and BatchNorm running statistics, bit for bit
        assert visit["rng_kept"], visit
        assert visit["identical_activations"], visit
        assert visit["identical_snapshots"], visit
        assert not visit["hooks_left"], visit
    assert _no_hooks(model)
    assert _epochs(callback.history) == [0, 1, 2]


def test_training_is_identical_with_and_without_the_callback(make_trainer, digits, digits_loaders, digits_cnn):
    x, y = digits

    def train(callbacks):
        torch.manual_seed(1)
        model = digits_cnn()
        loader = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=64, shuffle=True)  # draws from torch's RNG
        trainer = make_trainer(callbacks, max_epochs=2, limit_train_batches=3, logger=False)
        trainer.fit(model, loader, digits_loaders[1])
        assert trainer.global_step == 6
        return model.state_dict(), torch.rand(1)

    plain, plain_rng = train([])
    callback = SVCCACallback(probe=x[PROBE], layers=LAYERS, **SMALL)
    monitored, monitored_rng = train([callback])
    assert _epochs(callback.history) == [0, 1, 2]
    assert plain.keys() == monitored.keys()
    for name, value in plain.items():
        assert torch.equal(value, monitored[name]), name
    assert torch.equal(plain_rng, monitored_rng)


# ----------------------------------------------------------------------------------------------------------------
# Fixed references
# ----------------------------------------------------------------------------------------------------------------


def test_fixed_references(make_trainer, tmp_path, digits, digits_loaders, digits_cnn):
    x, y = digits
    torch.manual_seed(0)
    model = digits_cnn()
    copy_of_model = copy.deepcopy(model)
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    labels = nn.functional.one_hot(y[PROBE], 10).float()
    callback = SVCCACallback(
        probe=x[PROBE],
        layers=LAYERS,
        reference={"copy": copy_of_model, "checkpoint": str(checkpoint), "labels": labels},
        metrics=("svcca", "linear_cka"),
        **SMALL,
    )
    trainer = make_trainer([callback], max_epochs=1, logger=False)
    trainer.fit(model, digits_loaders[0], digits_loaders[1])
    history = callback.history
    assert callback.reference_names == ["copy", "checkpoint", "labels"]
    for reference in ("copy", "checkpoint"):
        for layer in LAYERS:
            for metric in ("svcca", "linear_cka"):
                values = _values(history, reference, layer, metric)
                assert values[0] == pytest.approx(1.0, abs=1e-6), (reference, layer, metric)
                assert set(values) == {0, 1}
    for layer in LAYERS:
        values = _values(history, "labels", layer)
        assert set(values) == {0, 1}
        assert all(0.0 <= value <= 1.0 for value in values.values())
    # the model's own weights came back after the checkpoint reference was probed
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), copy_of_model.parameters(), strict=True))
    assert copy_of_model.training  # the reference module keeps its mode
    assert _no_hooks(copy_of_model) and _no_hooks(model)


def test_input_feature_reference_for_fully_connected_layers(make_trainer, digits, digits_loaders, digits_cnn):
    x, _ = digits
    callback = SVCCACallback(probe=x[PROBE], layers=["relu1", "fc1", "fc2"], reference={"inputs": x[PROBE]}, **SMALL)
    make_trainer([callback], max_epochs=1, logger=False).fit(digits_cnn(), digits_loaders[0])
    assert {row["layer"] for row in callback.history if row["reference"] == "inputs"} == {"relu1", "fc1", "fc2"}


def test_reference_module_missing_layers_fails_at_fit_start(make_trainer, digits, digits_loaders, digits_cnn):
    x, _ = digits
    reference = digits_cnn()
    del reference.fc1, reference.relu2
    callback = SVCCACallback(probe=x[PROBE], layers=LAYERS, reference={"pretrained": reference}, **SMALL)
    model = digits_cnn()
    with pytest.raises(ValueError, match=r"'pretrained'.*no modules named \['relu2', 'fc1'\]"):
        make_trainer([callback], logger=False).fit(model, digits_loaders[0])
    assert _no_hooks(model)


def test_checkpoint_with_wrong_shapes_fails_clearly(make_trainer, tmp_path, digits, digits_loaders, digits_cnn):
    x, _ = digits
    other = digits_cnn()
    other.fc2 = nn.Linear(16, 3)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    model = digits_cnn()
    before = copy.deepcopy(model.state_dict())
    callback = SVCCACallback(probe=x[PROBE], layers=LAYERS, reference=path, **SMALL)
    with pytest.raises(ValueError, match=r"shape mismatches \['fc2.weight: \(3, 16\) vs \(10, 16\)'"):
        make_trainer([callback], logger=False).fit(model, digits_loaders[0])
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())


def test_missing_checkpoint_file_fails_at_fit_start(make_trainer, tmp_path, digits, digits_loaders, digits_cnn):
    callback = SVCCACallback(probe=digits[0][PROBE], layers=LAYERS, reference={"old": tmp_path / "nope.pt"})
    with pytest.raises(FileNotFoundError, match="'old'.*nope.pt"):
        make_trainer([callback], logger=False).fit(digits_cnn(), digits_loaders[0])


def test_spilled_snapshots_give_the_same_history_and_are_cleaned_up(
    make_trainer, tmp_path, digits, digits_loaders, digits_cnn
):
    x, _ = digits
    histories = []
    for budget in (None, 0):
        torch.manual_seed(0)
        callback = SVCCACallback(
            probe=x[PROBE],
            layers=["relu1", "fc2"],
            reference=("previous", "initial", "final"),
            metrics=("svcca", "pwcca"),
            max_snapshot_bytes=budget,
            **SMALL,
        )
        root = tmp_path / f"budget-{budget}"
        make_trainer([callback], max_epochs=2, logger=False, default_root_dir=root).fit(digits_cnn(), digits_loaders[0])
        # the run's snapshots live beside its history (as event files do); no temporary spill folder is left
        assert sorted(path.name for path in root.iterdir()) == ["svcca_history.csv", "svcca_snapshots"]
        assert callback.monitor.store.spill_dir is None or callback.monitor.store.spill_dir.parent.parent == root
        histories.append(callback.history)
    unbounded, spilled = histories
    assert [{**row, "value": None} for row in unbounded] == [{**row, "value": None} for row in spilled]
    for a, b in zip(unbounded, spilled, strict=True):
        assert a["value"] == pytest.approx(b["value"], abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"metrics": ("svcca", "kendall")},
            ValueError,
            r"metrics must be .*'pwcca', 'cca', 'linear_cka'.*\).*'kendall'",
        ),
        ({"metrics": ()}, ValueError, "metrics must be a non-empty"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs must be an int >= 1 or None, got 0"),
        ({"keep": 1.5}, ValueError, r"keep as a fraction must be in \(0, 1\], got 1.5"),
        ({"keep": 0.0}, ValueError, r"keep as a fraction must be in \(0, 1\]"),
        ({"keep": 0}, ValueError, "keep as a number of directions must be >= 1, got 0"),
        ({"keep": "all"}, TypeError, "keep must be"),
        ({"keep_by": "energy"}, ValueError, "keep_by must be one of"),
        ({"reference": {"dims": nn.Linear(2, 2)}}, ValueError, "'dims' cannot name a fixed reference"),
        ({"reference": {"final": nn.Linear(2, 2)}}, ValueError, "'final' cannot name a fixed reference"),
        ({"reference": [nn.Linear(2, 2), nn.Linear(2, 2)]}, ValueError, r"unique.*\['reference'\] twice"),
        ({"reference": ["previous", "previous"]}, ValueError, "unique"),
        ({"reference": {"a/b": nn.Linear(2, 2)}}, ValueError, "may not contain '/'"),
        ({"reference": []}, ValueError, "reference is empty"),
        ({"reference": 3}, TypeError, "reference must be"),
        ({"reference": torch.tensor(1.0)}, ValueError, "one row per probe sample"),
        ({"reduction": "max"}, ValueError, r"reduction must be one of \('positions', 'mean', 'flatten'\), got 'max'"),
        ({"probe_size": 0}, ValueError, "probe_size must be >= 1"),
        ({"probe_batch_size": 0}, ValueError, "probe_batch_size must be >= 1"),
        ({"max_datapoints": 1}, ValueError, "max_datapoints must be >= 2"),
        ({"compute_dtype": "float16"}, ValueError, "compute_dtype must be one of"),
        ({"freeze": "yes"}, TypeError, "freeze must be a FreezePolicy"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SVCCACallback(**kwargs)


def test_unknown_layer_fails_at_fit_start_with_close_matches(make_trainer, digits, digits_loaders, digits_cnn):
    callback = SVCCACallback(probe=digits[0][PROBE], layers=["conv_1", "fc2"])
    trainer = make_trainer([callback], logger=False)
    with pytest.raises(ValueError, match=r"'conv_1'.*did you mean \['conv1'"):
        trainer.fit(digits_cnn(), digits_loaders[0])
    assert trainer.global_step == 0


# ----------------------------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------------------------


class _Broken(nn.Module):
    """A side branch that outputs zeros ("dead") or NaN."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0 if self.kind == "dead" else x + float("nan")


class _WithBrokenBranches(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.dead = _Broken("dead")
        self.nan = _Broken("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        self.dead(out)
        self.nan(out)
        return out


@pytest.mark.filterwarnings("default::lightning_svcca.integrations.callback.SVCCAMonitorWarning")
def test_dead_and_nan_layers_are_skipped_with_a_warning(make_trainer):
    torch.manual_seed(0)
    callback = SVCCACallback(probe=torch.randn(64, 32), layers=["layer", "dead", "nan"], probe_size=64)
    trainer = make_trainer([callback], max_epochs=2, logger=False)
    with pytest.warns(SVCCAMonitorWarning) as record:
        trainer.fit(_WithBrokenBranches())
    messages = [str(warning.message) for warning in record if warning.category is SVCCAMonitorWarning]
    assert any(re.search(r"layer 'dead' skipped at epoch 0: .*zero variance", m) for m in messages), messages
    assert any(re.search(r"layer 'nan' skipped at epoch 0: .*NaN", m) for m in messages), messages
    # once per layer and problem, not every epoch
    assert sum("layer 'dead' skipped" in m for m in messages) == 1
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    assert {row["layer"] for row in callback.history} == {"layer"}
    assert _epochs(callback.history, layer="layer") == [0, 1, 2]
    assert {(epoch, layer) for epoch, layer, _ in callback.skipped} == {
        (epoch, layer) for epoch in (0, 1, 2) for layer in ("dead", "nan")
    }
    # a layer with NaN activations is no converged layer: the minimum EarlyStopping and ModelCheckpoint read is NaN
    # (over the layers left it read about 1 on a diverged model); a dead layer alone leaves it a number
    assert math.isnan(float(trainer.callback_metrics["svcca/previous/min_over_layers"]))


def test_a_dead_layer_alone_leaves_the_minimum_over_layers_a_number(make_trainer):
    class WithDeadBranch(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.dead = _Broken("dead")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x)
            self.dead(out)
            return out

    torch.manual_seed(0)
    callback = SVCCACallback(probe=torch.randn(64, 32), layers=["layer", "dead"], probe_size=64)
    trainer = make_trainer([callback], max_epochs=2, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(WithDeadBranch())
    value = float(trainer.callback_metrics["svcca/previous/min_over_layers"])
    assert value == pytest.approx(float(trainer.callback_metrics["svcca/previous/layer"]))


@pytest.mark.filterwarnings("default::lightning_svcca.integrations.callback.SVCCAMonitorWarning")
def test_named_layer_that_never_runs_is_dropped_with_a_warning(make_trainer):
    class WithUnused(BoringModel):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(2, 2)

    callback = SVCCACallback(probe=torch.randn(64, 32), layers=["layer", "unused"], reference=("previous", "final"))
    with pytest.warns(SVCCAMonitorWarning, match=r"layers \['unused'\] did not run"):
        make_trainer([callback], max_epochs=1, logger=False).fit(WithUnused())
    assert callback.layers == ["layer"]
    assert {row["layer"] for row in callback.history} == {"layer"}


def test_fast_dev_run(tmp_path, digits, digits_loaders, digits_cnn):
    callback = SVCCACallback(probe=digits[0][PROBE], layers=LAYERS, **SMALL)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        fast_dev_run=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(digits_cnn(), *digits_loaders)
    assert _epochs(callback.history) == [0, 1]
    assert _epochs(callback.history, "final") == [0, 1]


@pytest.mark.parametrize("with_validation", [False, True])
def test_default_probe_from_the_dataloaders(make_trainer, digits, digits_loaders, with_validation, digits_cnn):
    train, val = digits_loaders
    callback = SVCCACallback(layers=["fc1", "fc2"], probe_size=40, reference="previous")
    trainer = make_trainer([callback], max_epochs=1, logger=False, limit_val_batches=1 if with_validation else 0)
    trainer.fit(digits_cnn(), train, val if with_validation else None)
    source = (val if with_validation else train).dataset.tensors
    assert callback.monitor.probe.size == 40
    # a seeded subset of the dataset (probe_indices), not of a shuffled epoch
    chosen = probe_indices(len(source[0]), 40, seed=0)
    assert torch.equal(callback.monitor.probe.batch[0], source[0][chosen])
    assert torch.equal(callback.monitor.probe.batch[1], source[1][chosen])
    assert _epochs(callback.history, "previous") == [1]


def test_early_stopping_still_writes_the_final_reference(make_trainer, digits, digits_loaders, digits_cnn):
    callback = SVCCACallback(probe=digits[0][PROBE], layers=LAYERS, reference=("previous", "final"), **SMALL)
    stop = EarlyStopping(monitor="val_loss", stopping_threshold=1e9)  # stops after the first validation
    trainer = make_trainer([callback, stop], max_epochs=5, logger=False)
    trainer.fit(digits_cnn(), *digits_loaders)
    assert trainer.current_epoch < 5
    measured = _epochs(callback.history)
    assert measured == list(range(trainer.current_epoch + 1))
    for layer in LAYERS:
        finals = _values(callback.history, "final", layer)
        assert sorted(finals) == measured
        assert finals[measured[-1]] == pytest.approx(1.0, abs=1e-6)


def test_csv_logger(tmp_path, make_trainer, digits, digits_loaders, digits_cnn):
    logger = CSVLogger(tmp_path, name="csv")
    callback = SVCCACallback(probe=digits[0][PROBE], layers=["fc1", "fc2"], reference=("previous", "final"), **SMALL)
    trainer = make_trainer([callback], max_epochs=2, logger=logger)
    trainer.fit(digits_cnn(), *digits_loaders)
    logger.save()
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"svcca/previous/fc1", "svcca/dims/fc1", "svcca/baseline/fc2"} <= set(header)
    # the end-of-fit "final" curve belongs to earlier steps, which a CSVLogger cannot take: it is in the history
    # CSV beside the logger's metrics.csv
    assert "svcca/final/fc2" not in header
    assert read_history_csv(tmp_path / "csv" / "version_0" / "svcca_history.csv") == callback.history
    assert {row["reference"] for row in callback.history} >= {"final", "previous"}


def test_dict_probe_with_forward_fn_needs_no_probe_input(make_trainer):
    probe = {"a": torch.randn(32, 32), "b": torch.randn(32, 32)}
    callback = SVCCACallback(
        probe=probe,
        layers=["layer"],
        reference="previous",
        forward_fn=lambda model, batch: model(batch["a"] + batch["b"]),
    )
    make_trainer([callback], max_epochs=1, logger=False).fit(BoringModel())
    assert _epochs(callback.history, "previous") == [1]


# ----------------------------------------------------------------------------------------------------------------
# The `lightning` namespace
# ----------------------------------------------------------------------------------------------------------------


def test_lightning_namespace(tmp_path, digits):
    import lightning.pytorch as lp

    from lightning_svcca.integrations.lightning import SVCCACallback as LightningSVCCACallback

    class Net(lp.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, 16)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(x.flatten(1))))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = digits
    arguments = dict(layers=["fc1", "relu", "fc2"], reference=("previous", "final"), metrics=("svcca", "cca"))
    callback = LightningSVCCACallback(probe=x[PROBE], **arguments)
    assert isinstance(callback, lp.Callback)
    assert not isinstance(callback, pl.Callback)
    assert type(callback).__qualname__ == SVCCACallback.__qualname__
    assert callback.state_key == SVCCACallback(probe=x[PROBE], **arguments).state_key
    assert callback.state_key != SVCCACallback(probe=x[PROBE], **{**arguments, "metrics": ("svcca",)}).state_key
    trainer = lp.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.fit(Net(), DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64))
    assert _epochs(callback.history) == [0, 1, 2]
    assert callback.layers == ["fc1", "relu", "fc2"]
    assert (tmp_path / "lightning_logs" / "version_0" / "svcca_history.csv").is_file()
    assert not math.isnan(_values(callback.history, "final", "fc2")[0])


def test_lightning_namespace_tensorboard_logger_gets_the_extras(tmp_path):
    """Images and layouts go by duck typing on ``logger.experiment``, so the `lightning` TensorBoardLogger gets them."""
    import lightning.pytorch as lp
    from lightning.pytorch.demos.boring_classes import BoringModel as LightningBoringModel

    from lightning_svcca.integrations.lightning import SVCCACallback as LightningSVCCACallback

    torch.manual_seed(0)
    logger = lp.loggers.TensorBoardLogger(tmp_path, name="tb")
    callback = LightningSVCCACallback(probe=torch.randn(64, 32), layers=["layer"], reference="final")

    trainer = lp.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        callbacks=[callback],
    )
    trainer.fit(LightningBoringModel())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    assert "svcca/final/heatmap" in events.Tags()["images"]
    assert [event.step for event in events.Scalars("svcca/final/layer")] == [0, 2]  # global steps


def test_two_callbacks_with_different_probes_share_a_trainer(make_trainer, digits, digits_loaders, digits_cnn):
    x, _ = digits
    first = SVCCACallback(probe=x[:64], layers=["relu1"], reference="previous")
    second = SVCCACallback(probe=x[64:96], layers=["relu1"], reference="previous")
    assert first.state_key != second.state_key
    make_trainer([first, second], max_epochs=1, logger=False).fit(digits_cnn(), digits_loaders[0])
    assert first.history and second.history


def test_every_metric_through_the_callback(make_trainer, digits, digits_loaders, digits_cnn):
    """Each measure of metrics.METRICS is a callback metric, equal to the public function on the same data."""
    from lightning_svcca import cca_heldout, linear_cka, procrustes, r2cca, rbf_cka
    from lightning_svcca.pipeline.metrics import METRICS

    x, _ = digits
    probe = x[PROBE]
    torch.manual_seed(0)
    model = digits_cnn()
    initial = copy.deepcopy(model).eval()
    features = torch.randn(probe.shape[0], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    callback = SVCCACallback(
        probe=probe, layers=["fc1", "fc2"], reference={"features": features}, metrics=METRICS, baseline=False
    )
    make_trainer([callback], max_epochs=1, logger=False).fit(model, digits_loaders[0])
    rows = {(r["epoch"], r["layer"], r["metric"]): r["value"] for r in callback.history if r["reference"] == "features"}
    assert {metric for _, _, metric in rows} == set(METRICS)
    assert all(math.isfinite(value) for value in rows.values())
    # epoch 0 is the initial model: its fc2 output against the features, by the public functions
    with torch.no_grad():
        outputs = {}
        handle = initial.fc2.register_forward_hook(lambda module, inputs, output: outputs.update(fc2=output))
        initial(probe)
        handle.remove()
    fc2 = outputs["fc2"]  # float32, as the layer produced it: the rank cut follows its rounding level
    expected = {
        "linear_cka": linear_cka(fc2, features),
        "linear_cka_debiased": linear_cka(fc2, features, debiased=True),
        "procrustes": procrustes(fc2, features),
        "r2cca": r2cca(fc2, features),
        "rbf_cka": rbf_cka(fc2, features),
        "cca_heldout": cca_heldout(fc2, features).mean(),  # the metric is the mean held-out correlation
    }
    for metric, value in expected.items():
        # held-out CCA refits on the snapshot's rows (the layer's directions above its rounding level, stored in
        # float32), so the ridge chosen on the dev part can differ slightly from a fit on the raw activations
        # (-0.113 against -0.135 with this machine's BLAS kernels: a neighbouring ridge on the grid)
        tolerance = 0.03 if metric == "cca_heldout" else 1e-4
        assert rows[(0, "fc2", metric)] == pytest.approx(float(value), abs=tolerance), metric
