"""Long runs and real logging: every logger holds every value, monitorable metrics, no lost or duplicated rows."""

from __future__ import annotations

import csv
import io
import json
import struct
import warnings
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitor, SVCCAMonitorWarning
from lightning_svcca.output.reporting import read_history_csv, tag

from digits_models import DigitsCNN, digits_tensors
from helpers import quiet_trainer

LAYERS = ["relu1", "relu2", "fc2"]
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def digits_loader_and_probe():
    (x_train, y_train), (x_probe, _), _ = digits_tensors(n_train=3 * 64)
    return DataLoader(TensorDataset(x_train, y_train), batch_size=64), x_probe[:200]


def _trainer(root, callbacks, **overrides):
    return quiet_trainer(root, callbacks, **{"max_epochs": 3, "logger": True, **overrides})


def _keys(history):
    return [(r["epoch"], r["layer"], r["reference"], r["metric"]) for r in history]


# ----------------------------------------------------------------------------------------------------------------
# every logger holds every value
# ----------------------------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """Records of an offline W&B run file (LevelDB log framing of protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_every_logger_holds_every_value(tmp_path, digits_loader_and_probe, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loader, probe = digits_loader_and_probe
    loggers = [
        TensorBoardLogger(tmp_path, name="tb"),
        CSVLogger(tmp_path, name="csv"),
        MLFlowLogger(experiment_name="svcca", tracking_uri=f"file:{tmp_path / 'mlruns'}"),
        WandbLogger(project="svcca", save_dir=str(tmp_path), offline=True),
    ]
    torch.manual_seed(0)
    callback = SVCCACallback(probe=probe, layers=LAYERS, reference=("previous", "final"), probe_size=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, [callback], logger=loggers).fit(DigitsCNN(), loader)
    wandb_dir = Path(loggers[3].experiment.dir).parent
    loggers[3].experiment.finish()
    for logger in loggers[:2]:
        logger.save()
    history = callback.history
    live = [r for r in history if r["reference"] != "final"]
    final = [r for r in history if r["reference"] == "final"]
    assert {r["step"] for r in history} == {0, 3, 6, 9} and len(final) == len(LAYERS) * 4

    # TensorBoard: every row at its global step, the final curve included
    events = EventAccumulator(loggers[0].log_dir, size_guidance={"scalars": 0}).Reload()
    for r in history:
        logged = {e.step: e.value for e in events.Scalars(tag(r["metric"], r["reference"], r["layer"]))}
        assert logged[r["step"]] == pytest.approx(r["value"], abs=1e-6)

    # CSVLogger: live rows at their steps in metrics.csv, never a step backwards; the final curve in the history
    # CSV, which goes to the trainer's log_dir (the CSVLogger's own when it is the only logger)
    with open(Path(loggers[1].log_dir) / "metrics.csv") as handle:
        written = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in written]
    assert steps == sorted(steps)
    for r in live:
        name = tag(r["metric"], r["reference"], r["layer"])
        values = [float(row[name]) for row in written if row.get(name) and int(row["step"]) == r["step"]]
        assert values == [pytest.approx(r["value"], abs=1e-9)]
    assert read_history_csv(Path(loggers[0].log_dir) / "svcca_history.csv") == history

    # MLflow: live rows as metrics at their steps, the whole history (final included) as an artifact
    client, run_id = loggers[2].experiment, loggers[2].run_id
    for r in live:
        metric_history = client.get_metric_history(run_id, tag(r["metric"], r["reference"], r["layer"]))
        assert {m.step: m.value for m in metric_history}[r["step"]] == pytest.approx(r["value"], abs=1e-9)
    artifact = Path(client.download_artifacts(run_id, "svcca_history.csv", str(tmp_path / "download")))
    assert _keys(read_history_csv(artifact)) == _keys(history)
    assert any(
        path.suffix == ".png" for path in Path(client.download_artifacts(run_id, "", str(tmp_path / "all"))).iterdir()
    )

    # W&B (offline): live rows at increasing steps; the final curve as a table
    records = list(_wandb_records(next(wandb_dir.glob("run-*.wandb"))))
    logged = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            logged.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    for r in live:
        name = tag(r["metric"], r["reference"], r["layer"])
        values = [
            json.loads(h[name]) for h in logged if name in h and int(json.loads(h["trainer/global_step"])) == r["step"]
        ]
        assert values == [pytest.approx(r["value"], abs=1e-9)]
    table_file = next(wandb_dir.glob("files/media/table/svcca/final/*.table.json"))
    table = json.loads(table_file.read_text())
    column = table["columns"].index("value")
    assert sorted(row[column] for row in table["data"]) == pytest.approx(sorted(r["value"] for r in final))


# ----------------------------------------------------------------------------------------------------------------
# monitorable values
# ----------------------------------------------------------------------------------------------------------------


def test_an_mlflow_run_keeps_its_files_out_of_the_tracking_store(tmp_path, digits_loader_and_probe, monkeypatch):
    """Lightning's ``trainer.log_dir`` is MLflow's tracking store itself: a history CSV and a snapshot folder there
    made ``mlflow.search_experiments`` read ``svcca_snapshots`` as a malformed experiment. They go to
    ``default_root_dir``, as without a logger."""
    mlflow = pytest.importorskip("mlflow")
    from pytorch_lightning.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loader, probe = digits_loader_and_probe
    store, root = tmp_path / "mlruns", tmp_path / "root"
    logger = MLFlowLogger(experiment_name="svcca", tracking_uri=f"file:{store}")
    callback = SVCCACallback(probe=probe, layers=LAYERS, probe_size=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(root, [callback], logger=logger, max_epochs=1).fit(DigitsCNN(), loader)
    assert not list(store.glob("svcca*")) and (root / "svcca_history.csv").is_file()
    assert any((root / "svcca_snapshots").iterdir())
    experiments = mlflow.MlflowClient(tracking_uri=f"file:{store}").search_experiments()
    assert sorted(e.name for e in experiments) == ["Default", "svcca"] or [e.name for e in experiments] == ["svcca"]


def test_early_stopping_once_every_layer_has_converged(tmp_path, digits_loader_and_probe):
    loader, probe = digits_loader_and_probe
    torch.manual_seed(0)
    callback = SVCCACallback(probe=probe, layers=LAYERS, reference="previous", probe_size=200)
    stop = EarlyStopping(monitor="svcca/previous/min_over_layers", mode="max", stopping_threshold=0.95, patience=100)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="svcca/previous/relu1", mode="max")
    trainer = _trainer(tmp_path, [callback, stop, best], max_epochs=30, logger=False, enable_checkpointing=True)
    trainer.fit(DigitsCNN(lr=0.01), loader)
    lowest = {
        epoch: min(
            r["value"]
            for r in callback.history
            if r["epoch"] == epoch and r["reference"] == "previous" and r["metric"] == "svcca"
        )
        for epoch in callback.monitor.measured[1:]
    }
    stopped = callback.monitor.measured[-1]
    assert trainer.current_epoch < 30, "never stopped"
    assert lowest[stopped] >= 0.95 and all(value < 0.95 for epoch, value in lowest.items() if epoch < stopped)
    assert trainer.callback_metrics["svcca/previous/min_over_layers"] == pytest.approx(lowest[stopped])
    assert Path(best.best_model_path).is_file()


# ----------------------------------------------------------------------------------------------------------------
# nothing lost, nothing duplicated, nothing overwritten
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoint_saved_after_fit_resumes_without_duplicates(tmp_path, digits_loader_and_probe):
    loader, probe = digits_loader_and_probe
    torch.manual_seed(0)
    options = dict(probe=probe, layers=LAYERS, reference=("previous", "final"), probe_size=200)
    first = SVCCACallback(**options)
    trainer = _trainer(tmp_path / "a", [first], logger=False)
    model = DigitsCNN()
    trainer.fit(model, loader)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")  # e.g. after Ctrl-C, or to continue training later
    resumed = SVCCACallback(**options)
    _trainer(tmp_path / "b", [resumed], logger=False, max_epochs=5).fit(
        DigitsCNN(), loader, ckpt_path=tmp_path / "after_fit.ckpt"
    )
    counts = Counter(_keys(resumed.history))
    assert max(counts.values()) == 1
    assert sorted({r["epoch"] for r in resumed.history if r["reference"] == "final"}) == [0, 1, 2, 3, 4, 5]
    before = {k: r["value"] for k, r in zip(_keys(first.history), first.history, strict=True) if k[2] != "final"}
    after = {k: r["value"] for k, r in zip(_keys(resumed.history), resumed.history, strict=True)}
    assert all(after[key] == value for key, value in before.items())  # the first run's rows, kept as they were


def test_resume_without_snapshot_files_warns_and_goes_on(tmp_path, digits_loader_and_probe):
    loader, probe = digits_loader_and_probe
    options = dict(probe=probe, layers=LAYERS, reference=("previous", "final"), probe_size=200)
    first = SVCCACallback(**options)
    trainer = _trainer(tmp_path / "a", [first], logger=False)
    trainer.fit(DigitsCNN(), loader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    for path in (tmp_path / "a" / "svcca_snapshots").rglob("*.pt"):
        path.unlink()
    resumed = SVCCACallback(**options)
    with pytest.warns(SVCCAMonitorWarning, match="snapshot files .* are gone"):
        _trainer(tmp_path / "b", [resumed], logger=False, max_epochs=4).fit(
            DigitsCNN(), loader, ckpt_path=tmp_path / "run.ckpt"
        )
    assert {r["epoch"] for r in resumed.history} == {0, 1, 2, 3, 4}
    previous = [r for r in resumed.history if r["reference"] == "previous" and r["metric"] == "svcca"]
    assert [r["epoch"] for r in previous if r["layer"] == "fc2"] == [1, 2, 3]


def test_sequential_runs_in_one_folder_keep_their_own_files(tmp_path, digits_loader_and_probe):
    loader, probe = digits_loader_and_probe
    histories = []
    for epochs in (2, 1):
        callback = SVCCACallback(probe=probe, layers=LAYERS, reference="previous", probe_size=200)
        _trainer(tmp_path, [callback], logger=False, max_epochs=epochs).fit(DigitsCNN(), loader)
        histories.append(callback.history)
    assert read_history_csv(tmp_path / "svcca_history.csv") == histories[0]
    assert read_history_csv(tmp_path / "svcca_history-1.csv") == histories[1]
    assert len(list((tmp_path / "svcca_snapshots").iterdir())) == 2


def test_concurrent_monitors_in_one_folder_never_collide(tmp_path, digits_loader_and_probe):
    _, probe = digits_loader_and_probe
    monitors = [
        SVCCAMonitor(DigitsCNN(), probe=probe, layers=LAYERS, reference="previous", log_dir=tmp_path) for _ in range(3)
    ]
    for monitor in monitors:
        monitor.start()
    for epoch in (1, 2):
        for monitor in monitors:  # interleaved, as concurrent runs would be
            with torch.no_grad():
                monitor.model.fc2.weight.mul_(1.1)
            monitor.measure(epoch=epoch, step=epoch)
    names = sorted(monitor.outputs.csv_name for monitor in monitors)
    assert names == ["svcca_history-1.csv", "svcca_history-2.csv", "svcca_history.csv"]
    for monitor in monitors:
        assert read_history_csv(tmp_path / monitor.outputs.csv_name) == monitor.history
    assert len({monitor.outputs.run_id for monitor in monitors}) == 3
    assert not list(tmp_path.rglob("*.partial"))


# ----------------------------------------------------------------------------------------------------------------
# bounded checkpoints and per-measurement cost
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoint_state_does_not_grow_with_snapshots(tmp_path, digits_loader_and_probe):
    loader, probe = digits_loader_and_probe
    callback = SVCCACallback(probe=probe, layers=LAYERS, reference=("previous", "initial", "final"), probe_size=200)
    sizes = []

    class Sizes(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            buffer = io.BytesIO()
            torch.save(callback.state_dict(), buffer)
            sizes.append(buffer.tell())

    _trainer(tmp_path, [callback, Sizes()], logger=False, max_epochs=6).fit(DigitsCNN(), loader)
    snapshot_bytes = sum(callback.monitor.store.get(key).nbytes for key in callback.monitor.store.keys())
    assert sizes[-1] < snapshot_bytes / 10
    # what grows is the history: a few hundred bytes per layer and epoch
    growth = (sizes[-1] - sizes[0]) / (len(sizes) - 1) / len(LAYERS)
    assert growth < 2048


def test_live_final_heatmap_compares_a_bounded_number_of_epochs():
    from lightning_svcca.output.reporting import evenly_spaced
    from lightning_svcca.pipeline.comparisons import LIVE_FINAL_COLUMNS

    epochs = list(range(500))
    shown = evenly_spaced(epochs, LIVE_FINAL_COLUMNS)
    assert len(shown) == LIVE_FINAL_COLUMNS and shown[0] == 0 and shown[-1] == 499
    assert evenly_spaced(epochs[:10], LIVE_FINAL_COLUMNS) == epochs[:10]


def test_history_packs_bit_for_bit_and_small():
    from lightning_svcca.output.history import pack_history, unpack_history

    generator = torch.Generator().manual_seed(0)
    rows = [
        {"epoch": e, "step": 7 * e, "layer": f"encoder.layer.{i}", "reference": ref, "metric": "svcca", "value": v}
        for e in range(200)
        for i in range(3)
        for ref, v in (("previous", torch.rand(1, generator=generator).item()), ("dims", 12.0))
    ]
    packed = pack_history(rows)
    assert unpack_history(packed) == rows  # values bit for bit
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    assert buffer.tell() / len(rows) < 40  # bytes a row
    old = [{k: v for k, v in row.items() if k != "step"} for row in rows[:3]]  # checkpoints from before steps
    assert [row["step"] for row in unpack_history(old)] == [0, 0, 0]
