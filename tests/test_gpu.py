"""What only a CUDA GPU can show (skipped elsewhere; run on a GPU machine): fp16 autocast (``16-mixed``), freezing
and the frozen-prefix cache with the model on the GPU, a resume there, and Hugging Face models under autocast."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitorWarning

from digits_models import DigitsCNN, digits_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS = ["relu1", "relu2", "relu3", "fc2"]
FROZEN = ("conv1.weight", "conv1.bias", "bn1.running_mean", "bn1.running_var", "conv2.weight", "bn2.running_var")


@pytest.fixture(autouse=True)
def _deterministic_cudnn():
    """Same convolution algorithms in every fit (not ``Trainer(deterministic=True)``: it stays set for later tests
    and fails on ops without a deterministic CUDA kernel, such as adaptive average pooling's backward pass)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class _Spy(pl.Callback):
    """The state when the freezes are done (after epoch 2), the cache's counters, the gradients seen afterwards."""

    def __init__(self, callback: SVCCACallback) -> None:
        self.callback = callback
        self.after_freeze: dict[str, torch.Tensor] | None = None
        self.counters: dict[str, int] | None = None
        self.gradients_seen: set[str] = set()

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 3:
            self.after_freeze = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_after_backward(self, trainer, pl_module):
        if trainer.current_epoch >= 3:
            self.gradients_seen |= {name for name, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module):
        cache = self.callback.monitor.freezing.freezer.cache
        if cache is not None:
            self.counters = {"enabled": cache.enabled, "skipped": cache.skipped_batches, "verified": cache.verified}


def _fit(root, precision: str, cache: bool, *, epochs: int = 5, checkpoints=None, ckpt_path=None):
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    loader = DataLoader(
        TensorDataset(x_train[:320], y_train[:320]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    policy = FreezePolicy(mode="schedule", schedule={"relu1": 1, "relu2": 2}, cache_outputs=cache)
    callback = SVCCACallback(probe=x_probe[:128], layers=LAYERS, reference=["previous", "initial"], freeze=policy)
    spy = _Spy(callback)
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        accelerator="gpu",
        devices=1,
        precision=precision,
        callbacks=[callback, spy, *([checkpoints] if checkpoints else [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints is not None,
        logger=False,
    )
    pl.seed_everything(0, verbose=False)
    model = DigitsCNN()
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, callback, spy


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_freezing_and_the_cache_on_the_gpu(tmp_path, precision):
    """On the GPU, under autocast too: frozen weights fixed, no gradients, and the cache changes nothing."""
    plain, _, _ = _fit(tmp_path / "plain", precision, cache=False)
    cached, callback, spy = _fit(tmp_path / "cache", precision, cache=True)
    assert callback.frozen == {"relu1": 1, "relu2": 2}
    assert all(math.isfinite(row["value"]) for row in callback.history)
    assert {row["epoch"] for row in callback.history} == set(range(6))
    # epoch 3 fills the cache at the relu2 boundary; epochs 4 and 5 hit: 2 batches verified, 8 skipped
    assert spy.counters == {"enabled": True, "skipped": 8, "verified": 2}
    final = {name: value.cpu() for name, value in cached.state_dict().items()}
    for name in FROZEN:
        assert torch.equal(final[name], spy.after_freeze[name]), name
    assert spy.gradients_seen.isdisjoint({"conv1.weight", "conv2.weight", "bn2.weight"})
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(final[name], value.cpu(), rtol=1e-4, atol=1e-5, msg=name)


def test_resume_on_the_gpu_under_fp16_autocast(tmp_path):
    """16-mixed: the restored history and freezes, the frozen weights, and a cache rebuilt and verified again.

    The resumed fit's data order differs from the uninterrupted one's (the loader's generator starts afresh), so
    only what the checkpoint carries and what the freeze fixes must match.
    """
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    whole, whole_callback, _ = _fit(tmp_path / "whole", "16-mixed", cache=True, epochs=6, checkpoints=checkpoints)
    path = tmp_path / "ckpt" / "epoch=2-step=15.ckpt"
    resumed, callback, spy = _fit(tmp_path / "resumed", "16-mixed", cache=True, epochs=6, ckpt_path=path)
    assert callback.frozen == whole_callback.frozen == {"relu1": 1, "relu2": 2}
    # epoch 3 refills the cache, epoch 4 verifies two batches, epochs 4 and 5 skip the rest
    assert spy.counters == {"enabled": True, "skipped": 8, "verified": 2}

    def values(cb, last_epoch):
        return {
            (r["epoch"], r["layer"], r["reference"], r["metric"]): r["value"]
            for r in cb.history
            if r["epoch"] <= last_epoch
        }

    assert values(callback, 2) == values(whole_callback, 2)
    assert {row["epoch"] for row in callback.history} == set(range(7))
    assert all(math.isfinite(row["value"]) for row in callback.history)
    for name in FROZEN:
        assert torch.equal(resumed.state_dict()[name].cpu(), whole.state_dict()[name].cpu()), name


@pytest.mark.filterwarnings("ignore:.*SVCCA keeps")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("kind", ["bert", "wav2vec2"])
def test_hugging_face_models_under_autocast_on_the_gpu(tmp_path, kind, precision):
    """Defaults plus the model before fine-tuning as a reference and the linear freeze schedule; then a second fit."""
    pytest.importorskip("transformers")
    from test_models import _audio_data, _bert, _HFModule, _text_data, _wav2vec2

    make, data = (_bert, _text_data) if kind == "bert" else (_wav2vec2, _audio_data)
    model, reference = _HFModule(make().train()), _HFModule(make())  # the same seeded weights: "pretrained"
    loader = DataLoader(data(64, torch.Generator().manual_seed(0)), batch_size=16, shuffle=True)
    callback = SVCCACallback(
        probe_size=32, reference=("previous", "initial", {"pretrained": reference}), freeze=FreezePolicy(mode="linear")
    )
    for epochs in (2, 3):  # the second fit continues with the same callback (a new monitor per fit)
        trainer = pl.Trainer(
            max_epochs=epochs,
            default_root_dir=tmp_path / str(epochs),
            accelerator="gpu",
            devices=1,
            precision=precision,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SVCCAMonitorWarning)
            trainer.fit(model, loader)
        history = callback.history
        assert history and all(math.isfinite(row["value"]) for row in history)
        assert {row["reference"] for row in history} >= {"previous", "initial", "pretrained"}
        similarities = [row["value"] for row in history if row["reference"] in ("previous", "initial", "pretrained")]
        assert all(-1e-4 <= value <= 1 + 1e-4 for value in similarities)
        assert callback.frozen, "the linear schedule froze nothing"
