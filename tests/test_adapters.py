"""The monitor without Lightning: a plain loop and the HuggingFace Trainer give the Lightning callback's history.

Each run trains the same initial weights on the same batches in the same order with the same optimizer, so the
three histories must agree value for value (up to float rounding in the different loops' loss reductions).
"""

from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor, TensorBoardWriter

from digits_models import DigitsCNN, digits_tensors

transformers = pytest.importorskip("transformers")

from hf_helpers import hf_trainer, sgd  # noqa: E402 - needs transformers

LAYERS = ["relu1", "relu2", "relu3", "fc2"]
EPOCHS = 3
OPTIONS = dict(layers=LAYERS, reference=("previous", "initial", "final"), probe_size=256)


@pytest.fixture(scope="module")
def digits_train_and_probe():
    (x_train, y_train), (x_probe, _), _ = digits_tensors(n_train=384)
    return TensorDataset(x_train, y_train), x_probe


@pytest.fixture(scope="module")
def initial_model():
    torch.manual_seed(0)
    return DigitsCNN(lr=0.05, weight_decay=0.0)


def _keyed(history):
    return {(r["epoch"], r["layer"], r["reference"], r["metric"]): r["value"] for r in history}


def _assert_same_history(history, expected):
    got, want = _keyed(history), _keyed(expected)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=0, abs_tol=2e-5), key


def _lightning_history(tmp_path, model, digits_train_and_probe):
    train, probe = digits_train_and_probe
    callback = SVCCACallback(probe=probe, **OPTIONS)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(train, batch_size=64))
    return callback.history


@pytest.fixture(scope="module")
def lightning_history(tmp_path_factory, initial_model, digits_train_and_probe):
    return _lightning_history(
        tmp_path_factory.mktemp("lightning"), copy.deepcopy(initial_model), digits_train_and_probe
    )


def _train_plain(model, optimizer, monitor, train, after_epoch=None):
    """A hand-written training loop driving the monitor: start, before_batch, measure each epoch, finish."""
    monitor.start()
    step = 0
    for epoch in range(EPOCHS):
        model.train()
        for x, y in DataLoader(train, batch_size=64):
            monitor.before_batch()
            loss = functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        monitor.measure(epoch=epoch + 1, step=step)
        if after_epoch is not None:
            after_epoch(epoch)
    monitor.finish(epoch=EPOCHS, step=step)


def test_plain_loop_gives_the_callbacks_history(tmp_path, initial_model, digits_train_and_probe, lightning_history):
    train, probe = digits_train_and_probe
    model = copy.deepcopy(initial_model)
    optimizer = sgd(model)
    with SVCCAMonitor(model, probe=probe, writers=TensorBoardWriter(tmp_path), log_dir=tmp_path, **OPTIONS) as monitor:
        _train_plain(model, optimizer, monitor, train)
    _assert_same_history(monitor.history, lightning_history)
    monitor.writers[0].close()
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {"svcca/previous/relu1", "svcca/final/fc2"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "svcca_history.csv").is_file()


def test_hf_trainer_gives_the_callbacks_history(tmp_path, initial_model, digits_train_and_probe, lightning_history):
    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback

    train, probe = digits_train_and_probe
    callback = SVCCATrainerCallback(probe=probe, **OPTIONS)
    hf_trainer(tmp_path, copy.deepcopy(initial_model), train, callback, EPOCHS).train()
    _assert_same_history(callback.history, lightning_history)
    events = EventAccumulator(str(tmp_path / "runs" / "svcca")).Reload()
    assert "svcca/previous/relu2" in events.Tags()["scalars"]


def test_hf_trainer_resume_continues_the_history(tmp_path, initial_model, digits_train_and_probe, lightning_history):
    from lightning_svcca.integrations.huggingface import STATE_FILE, SVCCATrainerCallback

    train, probe = digits_train_and_probe
    first = SVCCATrainerCallback(probe=probe, **OPTIONS)
    hf_trainer(tmp_path, copy.deepcopy(initial_model), train, first, EPOCHS, save_strategy="epoch").train()
    checkpoints = sorted(tmp_path.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert all((folder / STATE_FILE).is_file() for folder in checkpoints) and len(checkpoints) == EPOCHS
    resumed = SVCCATrainerCallback(probe=probe, **OPTIONS)
    trainer = hf_trainer(tmp_path, copy.deepcopy(initial_model), train, resumed, EPOCHS, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoints[1]))  # after epoch 2 of 3
    keys = [(r["epoch"], r["layer"], r["reference"], r["metric"]) for r in resumed.history]
    assert len(keys) == len(set(keys))
    _assert_same_history(resumed.history, lightning_history)
    # the resumed session is a TensorBoard run of its own: its final curve does not sit on the first session's
    step = int(checkpoints[1].name.split("-")[1])
    first_final = EventAccumulator(str(tmp_path / "runs" / "svcca")).Reload().Scalars(f"svcca/final/{LAYERS[0]}")
    resumed_events = EventAccumulator(str(tmp_path / "runs" / "svcca" / f"resumed_step{step}")).Reload()
    resumed_final = resumed_events.Scalars(f"svcca/final/{LAYERS[0]}")
    assert [e.step for e in first_final] == [e.step for e in resumed_final]  # one value per step in each run
    assert min(e.step for e in resumed_events.Scalars(f"svcca/previous/{LAYERS[0]}")) > step  # only the new ones


def test_plain_loop_freezing_keeps_frozen_weights_and_norms(initial_model, digits_train_and_probe):
    train, probe = digits_train_and_probe
    model = copy.deepcopy(initial_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1})
    with SVCCAMonitor(model, probe=probe, layers=LAYERS, reference="previous", freeze=policy) as monitor:
        after_first = {}

        def remember(epoch):
            if epoch == 0:
                after_first["frozen"] = {
                    k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "bn1"))
                }
                after_first["trained"] = model.fc2.weight.detach().clone()

        _train_plain(model, optimizer, monitor, train, after_epoch=remember)
        frozen, trained = after_first["frozen"], after_first["trained"]
    assert monitor.frozen == {"relu1": 1}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # weights and BN statistics
    assert not model.conv1.weight.requires_grad and model.conv1.weight.grad is None
    assert not torch.equal(model.fc2.weight, trained)


def test_monitor_needs_start_before_measure(initial_model, digits_train_and_probe):
    monitor = SVCCAMonitor(copy.deepcopy(initial_model), probe=digits_train_and_probe[1], layers=LAYERS)
    with pytest.raises(RuntimeError, match=r"call start\(\) before measure\(\)"):
        monitor.measure(epoch=1, step=1)


def test_importing_the_package_loads_no_lightning_tensorboard_or_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys, lightning_svcca, torch\n"
        "lightning_svcca.svcca(torch.randn(50, 4), torch.randn(50, 4))\n"
        "heavy = [m for m in ('pytorch_lightning', 'lightning', 'tensorboard', 'matplotlib') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _by_step(history):
    return {(r["step"], r["layer"], r["reference"], r["metric"]): r for r in history}


def test_hf_trainer_tells_the_monitor_the_epochs_it_will_run(tmp_path, initial_model, digits_train_and_probe):
    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback, _epochs_of

    train, probe = digits_train_and_probe
    callback = SVCCATrainerCallback(probe=probe, **OPTIONS)
    hf_trainer(tmp_path, copy.deepcopy(initial_model), train, callback, 5, max_steps=9).train()
    assert callback.monitor.runtime.max_epochs == 2  # max_steps=9 over 6-step epochs overrides num_train_epochs=5
    assert _epochs_of(SimpleNamespace(num_train_epochs=2.5), SimpleNamespace()) == 3  # the Trainer rounds up
    unbounded = SimpleNamespace(num_train_epochs=sys.maxsize)  # an iterable dataset run by max_steps
    assert _epochs_of(SimpleNamespace(num_train_epochs=3), unbounded) is None


def test_hf_trainer_measures_every_k_steps_like_the_lightning_callback(tmp_path, initial_model, digits_train_and_probe):
    """``every_n_train_steps=4`` over 6-step epochs, stopped at step 9 (epoch 1.5): measurements at steps 0, 4, 8
    and 9, labelled with the completed epochs (0, 0, 1, 1; the Trainer's 1.5 is not rounded up to 2), value for
    value the Lightning callback's history of the same run."""
    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback

    train, probe = digits_train_and_probe
    options = {**OPTIONS, "every_n_epochs": None, "every_n_train_steps": 4}
    hf = SVCCATrainerCallback(probe=probe, **options)
    hf_trainer(tmp_path / "hf", copy.deepcopy(initial_model), train, hf, 2, max_steps=9).train()
    at = sorted({(r["step"], r["epoch"]) for r in hf.history})
    assert at == [(0, 0), (4, 0), (8, 1), (9, 1)]

    lightning = SVCCACallback(probe=probe, **options)
    trainer = pl.Trainer(
        default_root_dir=tmp_path / "pl",
        max_steps=9,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lightning],
    )
    trainer.fit(copy.deepcopy(initial_model), DataLoader(train, batch_size=64))
    got, want = _by_step(hf.history), _by_step(lightning.history)
    assert got.keys() == want.keys()
    for key, row in want.items():
        assert math.isclose(got[key]["value"], row["value"], rel_tol=0, abs_tol=2e-5), key
        assert got[key]["epoch"] == row["epoch"], key  # both count completed epochs


def test_hf_trainer_measures_by_steps_and_epochs_once_per_step(tmp_path, initial_model, digits_train_and_probe):
    """Both cadences: every 4 steps and every epoch (6 steps), one measurement per step, epochs never rounded up."""
    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback

    train, probe = digits_train_and_probe
    callback = SVCCATrainerCallback(probe=probe, **{**OPTIONS, "every_n_train_steps": 4}, writers=None)
    hf_trainer(tmp_path, copy.deepcopy(initial_model), train, callback, 2).train()
    assert sorted({(r["step"], r["epoch"]) for r in callback.history}) == [(0, 0), (4, 0), (6, 1), (8, 1), (12, 2)]
