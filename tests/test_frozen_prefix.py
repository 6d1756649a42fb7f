"""Measurements past a frozen prefix: the frozen layers' snapshots are reused and the probe skips the prefix, with
the same history as a fit that records everything; a prefix that computes differently in eval mode is not served."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback

from digits_models import DigitsCNN, digits_tensors
from helpers import quiet_trainer

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
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=5)
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
    served = monitor.freezing.prefix.served_passes
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
    assert any("when the frozen prefix up to 'relu2' is served" in m for m in messages), messages
    assert runs[True][0].monitor.freezing.prefix.served_passes == 0
    plain, cached = (_values(runs[cache][0]) for cache in (False, True))
    for key, value in plain.items():
        assert cached[key] == pytest.approx(value, abs=1e-6), key


def _hugging_face(name: str):
    """(LightningModule, monitored layers, freeze schedule, dataset): a model from a tiny config without dropout
    (so its prefix can be cached), the lowest two monitored layers frozen after epochs 1 and 2."""
    transformers = pytest.importorskip("transformers")
    from test_models import SPEECH, TINY, _audio_data, _HFModule, _text_data

    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            vocab_size=100,
            max_position_embeddings=64,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **TINY,
        )
        model = _HFModule(transformers.BertForSequenceClassification(config))
        stem = "model.bert."
        layers = [stem + "embeddings", stem + "encoder.layer.0", stem + "encoder.layer.1", "model.classifier"]
        return model, layers, {layers[0]: 1, layers[1]: 2}, _text_data(96, torch.Generator().manual_seed(0))
    no_dropout = dict.fromkeys(
        [
            "hidden_dropout",
            "attention_dropout",
            "activation_dropout",
            "feat_proj_dropout",
            "final_dropout",
            "layerdrop",
        ],
        0.0,
    )
    config = transformers.Wav2Vec2Config(num_labels=3, mask_time_prob=0.0, **no_dropout, **SPEECH)
    model = _HFModule(transformers.Wav2Vec2ForSequenceClassification(config))
    stem = "model.wav2vec2."
    layers = [f"{stem}feature_extractor.conv_layers.{i}" for i in range(3)]
    layers += [f"{stem}encoder.layers.{i}" for i in range(2)] + ["model.classifier"]
    schedule = {layers[0]: 1, layers[1]: 2, layers[2]: 2}  # the strided feature encoder: frames 1600 -> 79
    return model, layers, schedule, _audio_data(48, torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*SVCCA keeps")
@pytest.mark.parametrize(("name", "precision"), [("bert", "32-true"), ("bert", "bf16-mixed"), ("wav2vec2", "32-true")])
def test_hugging_face_models_with_the_cache_through_a_resume_and_a_second_fit(tmp_path, name, precision):
    """The default probe (training data, with its padding mask): a resumed run with the cache measures what the
    same run without it measures, reusing the frozen layers and serving the probe; a second fit runs too."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(model, layers, schedule, data, cache, epochs, root, ckpt_path=None, callback=None):
        callback = callback or SVCCACallback(
            layers=layers,
            probe_size=48,
            freeze=FreezePolicy(mode="schedule", schedule=schedule, cache_outputs=cache),
        )
        loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        trainer = pl.Trainer(
            max_epochs=epochs,
            default_root_dir=root,
            accelerator="cpu",
            precision=precision,
            callbacks=[callback, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
        )
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return callback

    runs = {}
    for cache in (False, True):  # both resumed (a resumed loader restarts its shuffling: the same data order)
        model, layers, schedule, data = _hugging_face(name)
        root = tmp_path / str(cache)
        fit(model, layers, schedule, data, cache, 3, root)
        runs[cache] = fit(model, layers, schedule, data, cache, 6, root, ckpt_path=root / "ckpt" / "last.ckpt")
    plain, resumed = runs[False], runs[True]
    assert resumed.frozen == plain.frozen == schedule
    expected, measured = _values(plain), _values(resumed)
    assert expected.keys() == measured.keys()
    tolerance = 1e-4 if precision == "32-true" else 1e-3  # measured: equal to 1e-16 on this machine
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, abs=tolerance), key
    # after the resume the cache is rebuilt (epoch 4), verified (epoch 5): measurements 5 and 6 reuse the frozen
    # layers and the probe skips them; under bf16-mixed the probe runs in float32 (probe_autocast=False), which
    # the cache's bf16-computed outputs are not, so it runs in full
    assert resumed.monitor.freezing.prefix.served_passes == (2 if precision == "32-true" else 0)
    frozen = list(schedule)
    for epoch in (5, 6):
        assert all(measured[(epoch, layer, "previous", "svcca")] == pytest.approx(1.0, abs=1e-4) for layer in frozen)
    # a second fit of the same callback: a run of its own, measured to the end
    second = fit(model, layers, schedule, data, True, 2, tmp_path / "second", callback=resumed)
    assert second.monitor.measured and all(math.isfinite(row["value"]) for row in second.history)
