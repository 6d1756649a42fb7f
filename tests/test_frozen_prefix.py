"""Measurements past a frozen prefix: the frozen layers' snapshots are reused and the probe skips the prefix, with
the same history as a fit that records everything; a prefix that computes differently in eval mode is not served."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback

from digits_models import DigitsCNN, digits_tensors

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


class _EvalShift(DigitsCNN):
    """relu1's output moves by 1 in eval mode only: the cache (filled in training) cannot stand in for it."""

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = x if self.training else x + 1.0
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def _fit(tmp_path, model, cache: bool, probe: torch.Tensor) -> tuple[SVCCACallback, dict[int, int]]:
    """Five epochs, relu1 frozen after the first and relu2 after the second; conv1 computations per epoch in eval
    mode (probe passes: a short cut returns its input)."""
    (x_train, y_train), _, _ = digits_tensors()
    loader = DataLoader(
        TensorDataset(x_train[:320], y_train[:320]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1, "relu2": 2}, cache_outputs=cache)
    callback = SVCCACallback(probe=probe, layers=LAYERS, reference=["previous", "initial", "final"], freeze=policy)
    probe_runs: dict[int, int] = {}

    def count(module, args, output):
        if not model.training and output is not args[0]:
            epoch = trainer.current_epoch
            probe_runs[epoch] = probe_runs.get(epoch, 0) + 1

    model.conv1.register_forward_hook(count)
    trainer = pl.Trainer(
        max_epochs=5,
        default_root_dir=tmp_path,
        accelerator="cpu",
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    return callback, probe_runs


def _values(callback: SVCCACallback) -> dict[tuple, float]:
    return {(r["epoch"], r["layer"], r["reference"], r["metric"]): r["value"] for r in callback.history}


@pytest.mark.parametrize("probe_from", ["training data", "held-out data"])
def test_frozen_layers_are_reused_and_the_probe_skips_the_prefix(tmp_path, probe_from):
    (x_train, _), (x_probe, _), _ = digits_tensors()
    probe = x_train[:128] if probe_from == "training data" else x_probe[:128]
    runs = {}
    for cache in (False, True):
        pl.seed_everything(0, verbose=False)
        runs[cache] = _fit(tmp_path / str(cache), DigitsCNN(), cache, probe)
    plain, cached = (_values(runs[cache][0]) for cache in (False, True))
    assert plain.keys() == cached.keys()
    for key, value in plain.items():
        assert cached[key] == pytest.approx(value, abs=1e-6), key
    # the relu2 cache fills in epoch 3 and verifies in epoch 4: measurements 4 and 5 reuse relu1's and relu2's
    # snapshots, and a frozen layer reads 1 against the previous epoch (to the decomposition's rounding)
    for epoch in (4, 5):
        assert all(cached[(epoch, layer, "previous", "svcca")] == pytest.approx(1.0, abs=1e-5) for layer in LAYERS[:2])
    monitor = runs[True][0].monitor
    served = monitor._frozen_prefix.served_passes
    probe_runs = runs[True][1]
    if probe_from == "training data":
        # measurements 4 and 5 (Lightning's epochs 3 and 4) skip conv1; the first of them checks 64 samples in full
        assert served == 2
        assert probe_runs.get(3) == 1 and 4 not in probe_runs
        assert runs[False][1][3] == runs[False][1][4] == 1
    else:
        # nothing of the probe is cached: it runs in full (after one try of 64 samples), but relu1 and relu2 are
        # not decomposed again
        assert served == 0
        assert probe_runs[3] == 2 and probe_runs[4] == 1


def test_a_prefix_that_differs_in_eval_mode_is_not_served(tmp_path):
    (x_train, _), _, _ = digits_tensors()
    runs = {}
    for cache in (False, True):
        pl.seed_everything(0, verbose=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[cache] = _fit(tmp_path / str(cache), _EvalShift(), cache, x_train[:128])
        messages = [str(w.message) for w in caught]
    assert any("probe's output changes when the frozen prefix up to 'relu2'" in m for m in messages), messages
    assert runs[True][0].monitor._frozen_prefix.served_passes == 0
    plain, cached = (_values(runs[cache][0]) for cache in (False, True))
    for key, value in plain.items():
        assert cached[key] == pytest.approx(value, abs=1e-6), key
