"""Large layers and long runs: bounded snapshot memory, snapshot files beside the run, capped datapoints, GPU."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_svcca import SVCCACallback, SVCCAMonitor
from lightning_svcca.pipeline.layers import LayerSpec
from lightning_svcca.pipeline.probe import build_probe, run_probe
from lightning_svcca.pipeline.recording import ActivationRecorder
from lightning_svcca.pipeline.reduction import probe_share

from digits_models import DigitsCNN, digits_tensors

LAYERS = ["relu1", "relu2", "relu3", "fc2"]


class _StoreWatcher(pl.Callback):
    """Remembers, at each epoch end, what a checkpoint would hold and how much the store keeps in memory."""

    def __init__(self, svcca: SVCCACallback):
        self.svcca = svcca
        self.max_held = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.state = copy.deepcopy(self.svcca.state_dict())  # what a checkpoint saved now would hold
        self.max_held = max(self.max_held, self.svcca.monitor.store.memory_bytes)


def _fit(tmp_path, max_snapshot_bytes, model=None, epochs=4):
    pl.seed_everything(0, verbose=False)
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    callback = SVCCACallback(
        probe=x_probe,
        layers=LAYERS,
        reference=["previous", "initial", "final"],
        metrics=["svcca", "pwcca"],
        max_snapshot_bytes=max_snapshot_bytes,
    )
    watcher = _StoreWatcher(callback)
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        callbacks=[callback, watcher],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=4,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=64)
    trainer.fit(model or DigitsCNN(), loader)
    return callback, watcher


def test_a_small_budget_holds_memory_and_loses_nothing(tmp_path):
    unbounded, _ = _fit(tmp_path / "unbounded", None)
    one_snapshot = max(unbounded.monitor.store.get(key).nbytes for key in unbounded.monitor.store.keys())
    bounded, watcher = _fit(tmp_path / "bounded", 2 * one_snapshot)
    assert watcher.max_held <= 2 * one_snapshot
    # the same numbers as without a budget, final reference included
    assert [(r["epoch"], r["layer"], r["reference"], r["metric"]) for r in bounded.history] == [
        (r["epoch"], r["layer"], r["reference"], r["metric"]) for r in unbounded.history
    ]
    for a, b in zip(bounded.history, unbounded.history, strict=True):
        assert a["value"] == pytest.approx(b["value"], abs=1e-12)
    assert {r["epoch"] for r in bounded.history if r["reference"] == "final"} == {0, 1, 2, 3, 4}
    # the snapshots are the run's data, beside its history: one file each, still there after fit
    folder = tmp_path / "bounded" / "svcca_snapshots" / bounded.monitor.outputs.run_id
    assert len(list(folder.glob("*.pt"))) == len(LAYERS) * 5


def test_checkpoints_hold_snapshot_file_names_not_snapshots(tmp_path):
    _, watcher = _fit(tmp_path, 1, epochs=2)
    state = watcher.state
    snapshots = dict(state["snapshots"])
    folder = Path(snapshots.pop("")["folder"])
    assert {key.rpartition("@")[2] for key in snapshots} == {"0", "1", "2"}
    assert all(set(value) == {"name"} and (folder / value["name"]).is_file() for value in snapshots.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert buffer.tell() < 64 * 1024  # 12 snapshots of up to 64 x 256 floats each are not in it


class _Exploding(DigitsCNN):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_a_checkpoint_saved_after_a_failed_fit_is_complete(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, 1, model=_Exploding())
    files = list((tmp_path / "svcca_snapshots").rglob("*.pt"))
    assert len(files) == len(LAYERS) * 3  # epochs 0-2: nothing deleted while a checkpoint may need it
    assert not list(tmp_path.rglob(".svcca_snapshots_*")) and not list(tmp_path.rglob("*.partial"))


class _WideConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.encoder = nn.GRU(16, 24, batch_first=True)

    def forward(self, x):
        feature_map = self.conv(x)  # (N, 16, 64, 64): 4096 positions per sample
        return self.encoder(feature_map.flatten(2).transpose(1, 2)[:, :50])


def test_capped_datapoints_bound_what_a_layer_keeps():
    """64 samples x 4096 positions = 262,144 candidate rows; max_datapoints=2048 keeps 32 per sample."""
    model = _WideConv()
    probe = build_probe(torch.randn(64, 3, 64, 64), None)
    specs = [LayerSpec("conv"), LayerSpec("encoder")]
    share = probe_share(2048, probe.size)
    recorder = ActivationRecorder(model, specs, per_sample=share)
    with recorder:
        run_probe(
            model,
            probe,
            chunk_size=16,
            device=torch.device("cpu"),
            before_chunk=lambda first, chunk: recorder.start_chunk(first, None, chunk.shape[0], torch.device("cpu")),
        )
    assert share == 32
    assert recorder.activations["conv"].shape == (2048, 16)
    assert recorder.activations["encoder"].shape == (2048, 24)  # 50 frames per sample, thinned to 32
    assert torch.equal(recorder.sample_ids["conv"], torch.arange(64).repeat_interleave(32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compute_dtype", ["float64", "float32"])
def test_gpu_run_matches_cpu(tmp_path, compute_dtype):
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    results = {}
    for accelerator in ("cpu", "gpu"):
        pl.seed_everything(0, verbose=False)
        callback = SVCCACallback(probe=x_probe, layers=LAYERS, reference=["initial"], compute_dtype=compute_dtype)
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator=accelerator,
            devices=1,
            default_root_dir=tmp_path / accelerator,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_train_batches=1,
        )
        trainer.fit(DigitsCNN(lr=0.0), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train)))
        # epoch 0 is measured before any training step: the same seeded weights on both devices
        results[accelerator] = {(r["layer"], r["reference"]): r["value"] for r in callback.history if r["epoch"] == 0}
    # the activations come from float32 forward passes on two devices (other kernels, other rounding), which the
    # measures amplify up to 1e-5 (the shuffled baseline of the 10-unit output layer) whatever the decomposition dtype
    tolerance = 1e-4
    for key, value in results["cpu"].items():
        assert results["gpu"][key] == pytest.approx(value, abs=tolerance), key


@pytest.mark.parametrize(
    ("device", "metrics", "compute_dtype", "expected"),
    [
        ("cuda", ["linear_cka"], "auto", torch.float32),
        ("cuda", ["svcca"], "auto", torch.float64),  # float32 Gram eigenvectors lose the small kept directions
        ("cuda", ["svcca", "linear_cka"], "auto", torch.float64),
        ("cpu", ["svcca"], "auto", torch.float64),
        ("cuda", ["svcca"], "float64", torch.float64),
        ("cpu", ["cca"], "float32", torch.float32),
    ],
)
def test_decomposition_precision(device, metrics, compute_dtype, expected):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.device = torch.device(device)  # the device a LightningModule reports; no GPU needed to check the choice
    monitor = SVCCAMonitor(model, probe=torch.zeros(4, 2), metrics=metrics, compute_dtype=compute_dtype)
    assert monitor.compute_dtype() == expected
