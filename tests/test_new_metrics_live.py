"""The sample-level metrics (mutual_knn, cknna, minibatch_cka, rsa) live in a fit: Lightning, a plain loop and the
HuggingFace Trainer; their calibrated scalars in TensorBoard; every measurement's heatmap in the event file."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitor, TensorBoardWriter, cknna, minibatch_cka, mutual_knn, rsa
from lightning_svcca.monitoring.config import MonitorConfig
from lightning_svcca.pipeline.sample_metrics import SAMPLE_METRICS

METRICS = ("svcca", *SAMPLE_METRICS)
EPOCHS = 5
N_PROBE = 96


class _MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 24), nn.Linear(24, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256 + N_PROBE, 12, generator=generator)
    y = (x[:, :3].argmax(dim=1)).long()
    return TensorDataset(x[:256], y[:256]), x[256:]


def _rows(history, reference, metric):
    return {
        (r["epoch"], r["layer"]): r["value"] for r in history if r["reference"] == reference and r["metric"] == metric
    }


def _check_history(history):
    for metric in SAMPLE_METRICS:
        for name in (metric, f"{metric}_calibrated"):
            values = _rows(history, "previous", name)
            assert len(values) == 2 * EPOCHS, name  # two layers, epochs 1..EPOCHS against the one before
            assert all(math.isfinite(v) for v in values.values()), name
        final = _rows(history, "final", metric)
        assert final[(EPOCHS, "fc1")] == pytest.approx(1.0, abs=1e-6)  # the last point against itself
        baseline, raw = _rows(history, "baseline", metric), _rows(history, "previous", metric)
        calibrated = _rows(history, "previous", f"{metric}_calibrated")
        for key, value in raw.items():
            b = baseline[key]
            assert calibrated[key] == pytest.approx((value - b) / (1 - b), abs=1e-12)


def test_lightning_fit_measures_the_new_metrics_against_the_public_functions(tmp_path, data):
    from pytorch_lightning.loggers import TensorBoardLogger

    train, probe = data
    torch.manual_seed(0)
    model = _MLP()
    initial = copy.deepcopy(model)
    callback = SVCCACallback(
        probe=probe, layers=["fc1", "fc2"], reference=("previous", "final"), metrics=METRICS, heatmap_time_share=1.0
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(train, batch_size=64))
    _check_history(callback.history)
    # epoch 0 against epoch 1: the public functions on the two models' activations give the same values
    trained_once = _MLP()
    trained_once.load_state_dict(initial.state_dict())
    optimizer = torch.optim.SGD(trained_once.parameters(), lr=0.1)
    for x, y in DataLoader(train, batch_size=64):
        optimizer.zero_grad()
        functional.cross_entropy(trained_once(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        before, after = initial.fc1(probe).double(), trained_once.fc1(probe).double()
    expected = {
        "mutual_knn": mutual_knn(after, before, k=10),
        "cknna": cknna(after, before, k=10),
        "minibatch_cka": minibatch_cka(after, before, batch_size=256),
        "rsa": rsa(after, before),
    }
    for metric, value in expected.items():
        assert _rows(callback.history, "previous", metric)[(1, "fc1")] == pytest.approx(float(value), abs=1e-4), metric
    # calibrated scalars and every measurement's heatmap in the event file (TensorBoard's default keeps 4 images)
    event_dir = next(tmp_path.glob("tb/version_*"))
    events = EventAccumulator(str(event_dir), size_guidance={IMAGES: 0}).Reload()
    assert {"cknna_calibrated/previous/fc1", "rsa_calibrated/previous/fc2", "mutual_knn/baseline/fc1"} <= set(
        events.Tags()["scalars"]
    )
    steps = [event.step for event in events.Images("cknna/previous/heatmap")]
    assert len(steps) == EPOCHS and steps == sorted(steps)
    default = EventAccumulator(str(event_dir)).Reload()
    assert len(default.Images("cknna/previous/heatmap")) <= 4  # why docs/measures.md says --samples_per_plugin


def _train_plain(model, monitor, train):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.start()
    step = 0
    for epoch in range(EPOCHS):
        for x, y in DataLoader(train, batch_size=64):
            optimizer.zero_grad()
            functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
        monitor.measure(epoch=epoch + 1, step=step)
    monitor.finish(epoch=EPOCHS, step=step)


def test_plain_loop_measures_the_new_metrics(tmp_path, data):
    train, probe = data
    torch.manual_seed(0)
    model = _MLP()
    writer = TensorBoardWriter(tmp_path)
    options = dict(layers=["fc1", "fc2"], reference=("previous", "final"), metrics=METRICS)
    with SVCCAMonitor(model, probe=probe, writers=writer, log_dir=tmp_path, **options) as monitor:
        _train_plain(model, monitor, train)
    writer.close()
    _check_history(monitor.history)
    scalars = set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    assert {"minibatch_cka_calibrated/previous/fc2", "rsa/final/fc1"} <= scalars


def test_hf_trainer_measures_the_new_metrics(tmp_path, data):
    pytest.importorskip("transformers")
    from hf_helpers import hf_trainer

    from lightning_svcca.integrations.huggingface import SVCCATrainerCallback

    train, probe = data
    torch.manual_seed(0)
    model = _MLP()
    callback = SVCCATrainerCallback(
        probe=probe, layers=["fc1", "fc2"], reference=("previous", "final"), metrics=METRICS
    )
    hf_trainer(tmp_path, model, train, callback, EPOCHS).train()
    _check_history(callback.history)


def test_metric_names_are_accepted_and_unknown_ones_listed():
    assert MonitorConfig(metrics=METRICS).metrics == METRICS
    with pytest.raises(ValueError, match="'mutual_knn', 'cknna', 'minibatch_cka', 'rsa'"):
        MonitorConfig(metrics=("kendall",))
