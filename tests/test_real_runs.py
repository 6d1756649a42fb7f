"""SVCCACallback on real Trainers, the way users run it: every precision setting, measurements every k steps,
two-stage fits (linear probing, then fine-tuning) with the same callback, validate/test-only calls, debugging
runs that must write nothing, class-sorted datasets, and resuming from checkpoints."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitorWarning

from digits_models import TinyDigitsCNN

PRECISIONS = ["32-true", "64-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed"]
#: fp16 autocast needs a GPU: on a CPU Lightning swaps ``16-mixed`` for ``bf16-mixed`` (with a warning)
GPU_ONLY = {"16-mixed": "fp16 autocast (16-mixed) is GPU-only; on a CPU Lightning runs bf16-mixed instead"}
ACCELERATOR = "cuda" if torch.cuda.is_available() else "cpu"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}


def _trainer(root: Path, callbacks=(), **overrides) -> pl.Trainer:
    """A quiet Trainer writing under ``root``: 1 epoch of 4 batches, no checkpoints, TensorBoard by default."""
    kwargs = {
        "default_root_dir": root,
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 1,
        "enable_checkpointing": False,
        "callbacks": list(callbacks),
        **QUIET,
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def _model(seed: int = 0) -> TinyDigitsCNN:
    torch.manual_seed(seed)
    return TinyDigitsCNN(dropout=0.0)


def _rows(history, reference=None, epoch=None, step=None):
    return [
        row
        for row in history
        if (reference is None or row["reference"] == reference)
        and (epoch is None or row["epoch"] == epoch)
        and (step is None or row["step"] == step)
    ]


def _keys(rows):
    return [(row["epoch"], row["step"], row["layer"], row["reference"], row["metric"]) for row in rows]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def loaders(digits):
    x, y = digits
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:1628], y[1500:1628]), batch_size=64)
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------------


def _precision_run(tmp_path, digits, loaders, precision, **options):
    """One epoch of the digits CNN at ``precision``, compared with a fixed (float32) model of other weights."""
    x, _ = digits
    reference = _model(seed=1)
    callback = SVCCACallback(probe=x[:512], reference=("previous", "final", {"other": reference}), **options)
    model = _model()
    dtypes = []  # the dtype of fc1's output in every forward pass, probe passes included
    model.fc1.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    accelerator = ACCELERATOR if precision in GPU_ONLY else "cpu"
    trainer = _trainer(tmp_path / precision, [callback], precision=precision, accelerator=accelerator, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SVCCAMonitorWarning)  # small layers: SVCCA keeps most directions
        trainer.fit(model, loaders[0])
    return callback, set(dtypes)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_trains_and_measures(tmp_path, digits, loaders, precision):
    if precision in GPU_ONLY and ACCELERATOR == "cpu":
        pytest.skip(GPU_ONLY[precision])
    callback, dtypes = _precision_run(tmp_path, digits, loaders, precision)
    history = callback.history
    assert {row["epoch"] for row in history} == {0, 1}
    assert {row["reference"] for row in history} >= {"previous", "other", "final", "dims", "baseline"}
    assert all(math.isfinite(row["value"]) for row in history)
    assert {row["layer"] for row in _rows(history, "previous")} == {"conv1", "conv2", "fc1", "fc2"}
    similarities = [row["value"] for row in history if row["reference"] not in ("dims", "frozen")]
    assert all(-1e-6 <= value <= 1 + 1e-6 for value in similarities)
    # *-true: the probe ran in the model's own dtype (the activations were upcast only for the decomposition)
    expected = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}
    if precision in expected:
        assert dtypes == {expected[precision]}


def test_mixed_precision_probes_match_float32_unless_autocast_is_asked_for(tmp_path, digits, loaders):
    """bf16-mixed: the probe runs without autocast, so epoch 0 matches a 32-true run on the same weights."""
    float32, _ = _precision_run(tmp_path / "a", digits, loaders, "32-true")
    mixed, _ = _precision_run(tmp_path / "b", digits, loaders, "bf16-mixed")
    autocast, _ = _precision_run(tmp_path / "c", digits, loaders, "bf16-mixed", probe_autocast=True)

    def epoch0(callback):
        rows = _rows(callback.history, epoch=0)  # "final" rows compare with the trained weights, which differ
        return {(r["layer"], r["reference"]): r["value"] for r in rows if r["reference"] != "final"}

    expected, got, cast = epoch0(float32), epoch0(mixed), epoch0(autocast)
    assert {reference for _, reference in expected} == {"other", "dims", "baseline"}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    # under autocast the convolutions and Linear layers run in bfloat16: other values, fewer kept directions
    differences = [abs(cast[key] - value) for key, value in expected.items() if key[1] == "other"]
    assert max(differences) > 1e-3
    dims = [(cast[(layer, "dims")], expected[(layer, "dims")]) for layer, ref in expected if ref == "dims"]
    assert all(low <= high for low, high in dims) and any(low < high for low, high in dims)


@pytest.mark.filterwarnings("ignore:.*SVCCA keeps")  # 32 sentences are few for the pooler
def test_bert_under_bf16_precisions(tmp_path):
    """A tiny BERT on dict batches: bf16-mixed matches float32 at epoch 0, bf16-true measures in bfloat16."""
    test_models = pytest.importorskip("test_models")  # needs transformers
    data = test_models._text_data(48, torch.Generator().manual_seed(0))
    probe = {key: value[:32] for key, value in data.columns.items() if key != "labels"}
    initial = test_models._bert().state_dict()
    other = test_models._HFModule(test_models._bert())  # a fixed reference: the initial weights, perturbed
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))

    def run(precision):
        model = test_models._HFModule(test_models._bert().train())
        model.model.load_state_dict(initial)
        callback = SVCCACallback(probe=probe, reference=("previous", "final", {"other": other}))
        trainer = _trainer(tmp_path / precision, [callback], precision=precision, logger=False, limit_train_batches=2)
        trainer.fit(model, DataLoader(data, batch_size=16))
        return callback.history

    histories = {precision: run(precision) for precision in ("32-true", "bf16-mixed", "bf16-true")}
    for history in histories.values():
        assert {row["epoch"] for row in history} == {0, 1}
        assert all(math.isfinite(row["value"]) for row in history)
        # embeddings, 2 blocks, head; the pooler (one datapoint per sentence, 32 for its ~24 kept directions) is
        # left out of the default layers
        assert {row["layer"] for row in _rows(history, "previous")} == {
            "model.bert.embeddings",
            "model.bert.encoder.layer.0",
            "model.bert.encoder.layer.1",
            "model.classifier",
        }
    epoch0 = {
        precision: {(r["layer"], r["reference"]): r["value"] for r in _rows(h, epoch=0) if r["reference"] != "final"}
        for precision, h in histories.items()
    }
    assert epoch0["bf16-mixed"].keys() == epoch0["32-true"].keys()
    for key, value in epoch0["32-true"].items():
        assert epoch0["bf16-mixed"][key] == pytest.approx(value, abs=1e-4), key


# ----------------------------------------------------------------------------------------------------------------
# Measuring every k optimizer steps
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "every_n_epochs", "epochs"),  # 2 epochs of 4 steps: global step -> completed epochs at that step
    [
        (3, None, {0: 0, 3: 0, 6: 1, 8: 2}),  # the end of fit (step 8) is always measured
        (3, 1, {0: 0, 3: 0, 4: 1, 6: 1, 8: 2}),
        (2, 1, {0: 0, 2: 0, 4: 1, 6: 1, 8: 2}),  # step 4 is both a 2-step mark and the end of epoch 0
    ],
    ids=["every-3-steps-only", "every-3-steps-and-epochs", "every-2-steps-and-epochs"],
)
def test_every_n_train_steps_measures_every_k_steps(tmp_path, digits, loaders, every, every_n_epochs, epochs):
    x, _ = digits
    callback = SVCCACallback(probe=x[:256], every_n_train_steps=every, every_n_epochs=every_n_epochs, baseline=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(_model(), loaders[0])

    steps = sorted(epochs)
    history = callback.history
    assert sorted({row["step"] for row in _rows(history, "dims")}) == steps
    # the epoch column counts completed epochs at the row's step
    assert {row["step"]: row["epoch"] for row in history} == epochs
    assert sorted({row["step"] for row in _rows(history, "previous")}) == steps[1:]
    assert len(_keys(history)) == len(set(_keys(history)))  # nothing measured twice
    # TensorBoard: one point per measurement, at its global step; the CSV has the step column
    scalars = _scalars(trainer.log_dir)
    assert [step for step, _ in scalars["svcca/previous/fc1"]] == steps[1:]
    for row in _rows(history, "previous"):
        assert dict(scalars[f"svcca/previous/{row['layer']}"])[row["step"]] == pytest.approx(row["value"], abs=1e-6)
    table = _read_csv(Path(trainer.log_dir) / "svcca_history.csv")
    assert [int(r["step"]) for r in table] == [row["step"] for row in history]
    assert [int(r["epoch"]) for r in table] == [row["epoch"] for row in history]


@pytest.mark.parametrize("every_n_epochs", [None, 1], ids=["steps-only", "steps-and-epochs"])
def test_a_fit_stopped_mid_epoch_labels_its_last_measurement_with_the_completed_epochs(
    tmp_path, digits, loaders, every_n_epochs
):
    """``max_steps=6`` over 4-step epochs stops halfway through epoch 2, where Lightning's ``current_epoch`` already
    reads 2: the last measurement (step 6) counts 1 completed epoch, as the HuggingFace adapter labels it."""
    x, _ = digits
    callback = SVCCACallback(probe=x[:256], every_n_train_steps=4, every_n_epochs=every_n_epochs, baseline=False)
    trainer = _trainer(tmp_path, [callback], max_epochs=3, max_steps=6)
    trainer.fit(_model(), loaders[0])

    assert trainer.current_epoch == 2  # what the label must not be
    assert {row["step"]: row["epoch"] for row in callback.history} == {0: 0, 4: 1, 6: 1}
    assert len(_keys(callback.history)) == len(set(_keys(callback.history)))  # nothing measured twice
    table = _read_csv(Path(trainer.log_dir) / "svcca_history.csv")
    assert {int(r["step"]): int(r["epoch"]) for r in table} == {0: 0, 4: 1, 6: 1}


def test_a_convergence_policy_counts_its_lag_in_measurements(tmp_path, digits, loaders):
    """Step mode: lag=2 compares each layer with its snapshot two measurements (not two epochs) earlier."""
    x, _ = digits
    # every layer counts as converged
    policy = FreezePolicy(mode="convergence", threshold=0.01, lag=2, patience=1, min_epochs=0, task=None)
    callback = SVCCACallback(probe=x[:256], every_n_train_steps=1, every_n_epochs=None, freeze=policy, baseline=False)
    trainer = _trainer(tmp_path, [callback], logger=False, limit_train_batches=4)
    model = _model()
    trainer.fit(model, loaders[0])

    lagged = _rows(callback.history, "lag2")
    assert sorted({row["step"] for row in lagged}) == [2, 3, 4]  # step 2 is the first with a measurement 2 back
    # the bottom layer froze at the first measurement with a lag comparison, within the first epoch
    assert callback.frozen["conv1"] == 0
    frozen_at = min(
        row["step"] for row in _rows(callback.history, "frozen") if row["layer"] == "conv1" and row["value"]
    )
    assert frozen_at == 2
    assert not model.conv1.weight.requires_grad


def test_resuming_from_a_mid_epoch_checkpoint_continues_the_step_history(tmp_path, digits, loaders):
    x, _ = digits

    def run(root, ckpt_path=None):
        callback = SVCCACallback(probe=x[:256], every_n_train_steps=3, every_n_epochs=None, baseline=False)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = _trainer(root, [callback, saver], max_epochs=2, enable_checkpointing=True)
        trainer.fit(_model(), loaders[0], ckpt_path=ckpt_path)
        return callback, trainer

    whole, _ = run(tmp_path / "whole")
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert checkpoint.is_file()
    resumed, trainer = run(tmp_path / "resumed", ckpt_path=checkpoint)

    history = resumed.history
    assert len(_keys(history)) == len(set(_keys(history)))
    assert sorted({row["step"] for row in history}) == sorted({row["step"] for row in whole.history}) == [0, 3, 6, 8]
    # what was measured before the checkpoint is carried over unchanged
    before = [row for row in whole.history if row["step"] <= 3 and row["reference"] != "final"]
    assert [row for row in history if row["step"] <= 3 and row["reference"] != "final"] == before
    table = _read_csv(Path(trainer.log_dir) / "svcca_history.csv")
    assert [int(r["step"]) for r in table] == [row["step"] for row in history]


# ----------------------------------------------------------------------------------------------------------------
# Two-stage fits: linear probing, then full fine-tuning, with the same callback
# ----------------------------------------------------------------------------------------------------------------


def _backbone(model: TinyDigitsCNN, trainable: bool) -> None:
    for parameter in [*model.conv1.parameters(), *model.bn1.parameters(), *model.conv2.parameters()]:
        parameter.requires_grad_(trainable)


def _fine_tune(trainer, model, loader):
    """Stage 2 in a fixed data order, so a run of a fresh callback can be compared with it."""
    _backbone(model, True)
    trainer.fit(model, DataLoader(loader.dataset, batch_size=64))


@pytest.mark.parametrize("same_trainer", [False, True], ids=["new-trainer", "same-trainer"])
def test_a_second_fit_of_the_same_callback_is_a_run_of_its_own(tmp_path, digits, loaders, same_trainer):
    x, _ = digits
    options = {"probe": x[:256], "reference": ("previous", "initial", "final"), "baseline": False}
    callback = SVCCACallback(**options)
    model = _model()
    _backbone(model, False)  # stage 1: linear probing, the user froze the backbone
    first = _trainer(tmp_path, [callback], max_epochs=2)
    first.fit(model, loaders[0])
    stage1 = [dict(row) for row in callback.history]
    stage1_dir = Path(first.log_dir)
    stage1_csv = (stage1_dir / "svcca_history.csv").read_text()
    # conv1 reads the raw input and did not train: it is where it started (snapshots are float32 bases)
    assert all(
        row["value"] == pytest.approx(1.0, abs=1e-5) for row in _rows(stage1, "initial") if row["layer"] == "conv1"
    )

    # what stage 2 must record: a fresh callback fine-tuning an identical copy from the same point
    twin, twin_callback = _model(), SVCCACallback(**options)
    twin.load_state_dict(model.state_dict())
    _fine_tune(_trainer(tmp_path / "twin", [twin_callback], max_epochs=2, logger=False), twin, loaders[0])

    if same_trainer:
        second = first
        second.fit_loop.max_epochs = 4
    else:
        second = _trainer(tmp_path, [callback], max_epochs=2)
    _fine_tune(second, model, loaders[0])

    history = callback.history
    assert len(_keys(history)) == len(set(_keys(history)))
    assert sorted({row["epoch"] for row in history}) == [0, 1, 2]  # this fit's epochs, from 0
    start = 8 if same_trainer else 0  # the trainer's global step goes on; the epochs are this fit's
    assert sorted({row["step"] for row in history}) == [start, start + 4, start + 8]
    # epoch 0 is the model as stage 2 starts, and every value is what a fresh callback records
    for row, twin_row in zip(history, twin_callback.history, strict=True):
        assert {**row, "step": 0, "value": 0} == {**twin_row, "step": 0, "value": 0}
        assert row["value"] == pytest.approx(twin_row["value"], abs=1e-6), row
    assert min(row["value"] for row in _rows(history, "initial", epoch=2) if row["layer"] == "conv1") < 0.999

    # files: stage 1's CSV is untouched; stage 2's holds stage 2's rows only, in its own folder or under its own name
    assert (stage1_dir / "svcca_history.csv").read_text() == stage1_csv
    log_dir = Path(second.log_dir)
    assert (log_dir == stage1_dir) == same_trainer
    name = "svcca_history-1.csv" if same_trainer else "svcca_history.csv"
    table = _read_csv(log_dir / name)
    assert [(int(r["epoch"]), int(r["step"]), r["layer"], r["reference"]) for r in table] == [
        (row["epoch"], row["step"], row["layer"], row["reference"]) for row in history
    ]
    scalars = _scalars(log_dir)
    for layer in callback.layers:
        if same_trainer:  # one logger: both fits' curves share its tags, at distinct global steps
            assert [step for step, _ in scalars[f"svcca/previous/{layer}"]] == [4, 8, 12, 16]
        else:  # the new folder holds stage 2's points only, once each
            assert [step for step, _ in scalars[f"svcca/previous/{layer}"]] == [4, 8]
            assert [step for step, _ in scalars[f"svcca/dims/{layer}"]] == [0, 4, 8]
            assert [step for step, _ in scalars[f"svcca/final/{layer}"]] == [0, 4, 8]


def test_resuming_a_checkpoint_after_another_fit_continues_the_checkpointed_run(tmp_path, digits, loaders):
    x, _ = digits
    callback = SVCCACallback(probe=x[:256], baseline=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = _model()
    first = _trainer(tmp_path, [callback, saver], max_epochs=2, enable_checkpointing=True)
    first.fit(model, loaders[0])
    stage1 = [dict(row) for row in callback.history if row["reference"] != "final"]
    _trainer(tmp_path, [callback], max_epochs=1).fit(_model(seed=3), loaders[0])  # another run in between
    assert {row["epoch"] for row in callback.history} == {0, 1}

    resumed = _trainer(tmp_path, [callback], max_epochs=3)
    resumed.fit(model, loaders[0], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    history = callback.history
    assert [row for row in history if row["epoch"] <= 2 and row["reference"] != "final"] == [
        row for row in stage1 if row["epoch"] <= 2
    ]
    assert sorted({row["epoch"] for row in history}) == [0, 1, 2, 3]  # the checkpointed run's epochs go on
    assert len(_keys(history)) == len(set(_keys(history)))
    assert {row["step"] for row in _rows(history, "previous", epoch=3)} == {12}


# ----------------------------------------------------------------------------------------------------------------
# Calls that measure nothing, and runs that must write nothing (or only into default_root_dir)
# ----------------------------------------------------------------------------------------------------------------


class _Testable(TinyDigitsCNN):
    def test_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        return self.validation_step(batch, batch_idx)


def test_validate_and_test_alone_warn_once_that_nothing_is_measured(tmp_path, digits, loaders):
    x, _ = digits
    callback = SVCCACallback(probe=x[:256])
    trainer = _trainer(tmp_path, [callback], logger=False)
    model = _Testable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            trainer.validate(model, loaders[1], verbose=False)
            trainer.test(model, loaders[1], verbose=False)
    ours = [str(w.message) for w in caught if issubclass(w.category, SVCCAMonitorWarning)]
    assert len(ours) == 2
    assert "validate run records nothing" in ours[0] and "test run records nothing" in ours[1]
    assert callback.history == [] and not list(tmp_path.rglob("*svcca*"))


def test_validate_after_a_fit_is_the_usual_evaluation_and_warns_nothing(tmp_path, digits, loaders):
    x, _ = digits
    callback = SVCCACallback(probe=x[:256])
    trainer = _trainer(tmp_path, [callback], logger=False, max_epochs=1)
    model = _Testable()
    trainer.fit(model, loaders[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVCCAMonitorWarning)
        trainer.validate(model, loaders[1], verbose=False)
        trainer.test(model, loaders[1], verbose=False)
    assert {row["epoch"] for row in callback.history} == {0, 1}  # the fit's history is kept


@pytest.mark.parametrize("overrides", [{"fast_dev_run": True}, {"logger": False}], ids=["fast_dev_run", "no-logger"])
def test_nothing_is_written_outside_default_root_dir(tmp_path, monkeypatch, digits, loaders, overrides):
    x, _ = digits
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # a tiny snapshot budget: snapshots spill to files from the first measurement on
    callback = SVCCACallback(probe=x[:256], max_snapshot_bytes=1)
    trainer = _trainer(root, [callback], enable_checkpointing=False, **overrides)
    trainer.fit(_model(), loaders[0], loaders[1])

    assert callback.history  # it measured
    assert list(cwd.iterdir()) == []
    written = sorted(path.name for path in root.rglob("*") if path.is_file())
    if "fast_dev_run" in overrides:  # a debugging run: no files at all, as Lightning writes none
        assert written == []
    else:
        files = [path.relative_to(root) for path in root.rglob("*") if path.is_file()]
        assert (root / "svcca_history.csv").is_file()  # logger=False: the CSV and spilled snapshots in the root
        assert all(path.name == "svcca_history.csv" or path.parts[0] == "svcca_snapshots" for path in files)


# ----------------------------------------------------------------------------------------------------------------
# Class-sorted datasets (ImageFolder order)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [False, True], ids=["default-probe", "loader-probe"])
def test_a_class_sorted_dataset_gives_a_probe_of_every_class_and_the_same_after_resume(tmp_path, digits, given):
    x, y = digits
    order = torch.argsort(y, stable=True)
    sorted_set = TensorDataset(x[order], y[order])  # the first 200 samples hold classes 0 and 1 only
    assert set(sorted_set[:200][1].tolist()) == {0, 1}
    train = DataLoader(sorted_set, batch_size=64)

    def fit(callback, max_epochs=1, ckpt_path=None):
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = _trainer(tmp_path, [callback, saver], max_epochs=max_epochs, enable_checkpointing=True, logger=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", SVCCAMonitorWarning)  # e.g. "the probe differs from the checkpoint's"
            trainer.fit(model, train, ckpt_path=ckpt_path)
        return callback.monitor.probe.batch

    model = _model()
    probe = fit(SVCCACallback(probe=train if given else None, probe_size=200))
    labels = probe[1]
    assert len(labels) == 200 and set(labels.tolist()) == set(range(10))
    assert min(torch.bincount(labels).tolist()) >= 8  # a random subset: roughly 20 per class

    again = fit(SVCCACallback(probe=train if given else None, probe_size=200), max_epochs=2, ckpt_path="last")
    assert torch.equal(again[0], probe[0]) and torch.equal(again[1], labels)
