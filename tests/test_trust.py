"""Trust: no file runs code when read, no checkpoint string writes outside the log folder, no disk fault kills a fit.

Each payload test plants a pickle whose ``__reduce__`` would write a marker file, in a file of one type the
package reads, and shows the marker never appears and the error or warning names the file. The state tests edit
a real checkpoint's callback state; the disk tests damage snapshot files or make writes fail under real fits of
a small MLP.
"""

from __future__ import annotations

import errno
import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitor
from lightning_svcca.cli.main import main as cli_main
from lightning_svcca.core import safe_files
from lightning_svcca.core.safe_files import FileTrustWarning, UnreadableFileError
from lightning_svcca.freezing.cache_store import SampleStore
from lightning_svcca.monitoring.state_checks import plain_name, validate_state
from lightning_svcca.output.reporting import read_history_csv, write_history_csv
from lightning_svcca.pipeline.moments import CrossLayerMoments
from lightning_svcca.pipeline.snapshot import LocalCollective, build_snapshot
from lightning_svcca.pipeline.store import SnapshotStore

from helpers import failing_save, quiet_trainer

LAYERS = ["net.0", "net.2", "net.4"]


def _touch(path: str) -> dict:
    """What the payload would run: write the marker file."""
    Path(path).write_text("the payload ran")
    return {}


class Payload:
    """Unpickling this calls :func:`_touch` (only where arbitrary objects are unpickled)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _touch, (self.marker,)


def _plant(path: Path, marker: Path) -> Path:
    torch.save({"left": Payload(marker)}, path)
    return path


class TinyMLP(pl.LightningModule):
    """Three monitored linear layers on 10 features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> tuple[torch.Tensor, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 10, generator=generator), torch.randint(0, 3, (128,), generator=generator)
    return x[:64], DataLoader(TensorDataset(x, y), batch_size=32)


def _fit(root: Path, epochs: int, ckpt_path: str | None = None, **options: Any) -> tuple[SVCCACallback, list]:
    """Fit TinyMLP for ``epochs`` in ``root`` (last.ckpt kept); the callback and the warnings."""
    torch.manual_seed(0)
    probe, loader = _data()
    callback = SVCCACallback(probe=probe, layers=LAYERS, reference=("previous", "final"), **options)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    logger = pl.loggers.CSVLogger(root, name="logs", version=0)
    trainer = quiet_trainer(root, [callback, checkpoint], max_epochs=epochs, logger=logger, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyMLP(), train_dataloaders=loader, ckpt_path=ckpt_path)
    return callback, caught


def _texts(caught: list, category: type = FileTrustWarning) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


# ----------------------------------------------------------------------------------------------------------------
# 1. Nothing executable is read
# ----------------------------------------------------------------------------------------------------------------


def test_payload_runs_when_loaded_unsafely(tmp_path: Path) -> None:
    """The planted payload is real: ``weights_only=False`` runs it (so the tests below show something)."""
    marker = tmp_path / "marker"
    torch.load(_plant(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_snapshot_file_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    store = SnapshotStore(None, tmp_path / "snaps")
    rows = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    snapshot = build_snapshot(
        rows, LocalCollective(), name="a", keep=0.99, keep_by="singular_values", full_rank=True, with_right=False,
        input_eps=1e-7,
    )  # fmt: skip
    store.put(("a", "1"), snapshot)
    state = store.state_dict()
    reloaded = SnapshotStore(None)
    reloaded.load_state_dict(state)
    _plant(tmp_path / "snaps" / state["a@1"]["name"], marker)
    with pytest.warns(FileTrustWarning, match=r"layer 'a' at 1.*cannot read .*snaps.*refused"):
        with pytest.raises(KeyError):
            reloaded.get(("a", "1"))
    assert ("a", "1") not in reloaded and not marker.exists()


def test_cache_spill_file_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    store = SampleStore(0, lambda: tmp_path / "spill")
    store.store([b"k0", b"k1"], torch.randn(2, 3))
    _plant(store.files[0], marker)
    with pytest.raises(UnreadableFileError, match="prefix_000000.pt.*refused"):
        store.gather([b"k0"], torch.device("cpu"))
    assert not marker.exists()


def test_cross_layer_moment_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    moments = CrossLayerMoments([0.0], "final", folder=tmp_path / "moments")
    moments.observe(0, 0, 0, {"a": torch.randn(8, 2)}, total=4)
    _plant(tmp_path / "moments" / "cross_layer-0.00.pt", marker)
    moments.observe(4, 4, 4, {"a": torch.randn(8, 2)}, total=4)
    with pytest.warns(FileTrustWarning, match="cross_layer-0.00.pt"):
        moments.maps(["linear_cka"])
    assert not marker.exists()


def test_hf_state_payload_and_resume_folder(tmp_path: Path) -> None:
    """The HF state is read with weights_only from the folder the run resumes from, not under output_dir."""
    pytest.importorskip("transformers")
    from lightning_svcca.integrations.huggingface import STATE_FILE, SVCCATrainerCallback, resume_folders

    probe, _ = _data()
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), resume_from_checkpoint=None)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-7"
    elsewhere.mkdir(parents=True)

    def _inner_training_loop(resume_from_checkpoint: str) -> list[Path]:  # the Trainer's frame, as transformers has it
        return list(resume_folders(args, 7))

    assert _inner_training_loop(str(elsewhere))[0] == elsewhere
    # a real state saved elsewhere continues the history
    source = SVCCAMonitor(TinyMLP(), probe=probe, layers=LAYERS, baseline=False)
    source.start()
    source.measure(epoch=1, step=7)
    torch.save(source.state_dict(), elsewhere / STATE_FILE)
    callback = SVCCATrainerCallback(probe=probe, layers=LAYERS, baseline=False, writers=None)
    callback.monitor = SVCCAMonitor(TinyMLP(), probe=probe, layers=LAYERS, baseline=False)
    args.resume_from_checkpoint = str(elsewhere)
    callback._restore(args, SimpleNamespace(global_step=7))
    assert callback.monitor.history == source.history and callback.monitor.measured == [0, 1]
    # a crafted one is refused, with a warning naming it
    marker = tmp_path / "marker"
    _plant(elsewhere / STATE_FILE, marker)
    callback.monitor = SVCCAMonitor(TinyMLP(), probe=probe, layers=LAYERS, baseline=False)
    with pytest.warns(UserWarning, match=r"svcca_state.pt.*refused.*starts again"):
        callback._restore(args, SimpleNamespace(global_step=7))
    assert not marker.exists() and callback.monitor.history == []


def test_lightning_checkpoint_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    callback, _ = _fit(tmp_path / "run", 1)
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"][callback.state_key]["probe_fingerprint"] = Payload(marker)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        _fit(tmp_path / "run2", 2, ckpt_path=str(tmp_path / "crafted.ckpt"))
    assert not marker.exists()


def test_cli_compare_refuses_payloads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    model = TinyMLP()
    torch.save(model.net.state_dict(), tmp_path / "good.pt")
    torch.save(torch.randn(16, 10), tmp_path / "probe.pt")
    _plant(tmp_path / "bad.pt", marker)
    spec = f"{__name__}:PlainMLP"
    for a, probe in (("bad.pt", "probe.pt"), ("good.pt", "bad.pt")):
        status = cli_main(["compare", str(tmp_path / a), str(tmp_path / "good.pt"), "--model", spec, "--probe",
                           str(tmp_path / probe)])  # fmt: skip
        error = capsys.readouterr().err.strip()
        assert status == 2 and len(error.splitlines()) == 1, error
        assert "bad.pt" in error and "refused" in error and "Traceback" not in error
    assert not marker.exists()


class PlainMLP(nn.Sequential):
    """The TinyMLP's layers as a plain module (built without arguments by ``lightning-svcca compare``)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_checkpoint_reference_payload(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    probe, _ = _data()
    path = _plant(tmp_path / "reference.ckpt", marker)
    monitor = SVCCAMonitor(TinyMLP(), probe=probe, layers=LAYERS, reference=[str(path)], baseline=False)
    with pytest.raises(ValueError, match="reference.ckpt"):
        monitor.start()
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# 2. Everything read from a checkpoint is validated
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/abs/file", "../x", "..", ".", "", "a/b", "a\\b", "x\ny", "C:x", None, 3])
def test_plain_name_refuses(name: Any) -> None:
    with pytest.raises(ValueError, match="run_id"):
        plain_name(name, "run_id")


def _snapshot_of_tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but under ``skip``: size and modification time."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if skip not in path.parents:
                found[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns)
    return found


@pytest.mark.parametrize("field", ["csv_name", "run_id"])
def test_crafted_lightning_checkpoint_writes_nothing_outside(tmp_path: Path, field: str) -> None:
    """The audit's two cases, through a real resume: refused with the field named; nothing outside is touched."""
    callback, _ = _fit(tmp_path / "run", 1)
    victim = tmp_path / "victim.sh"
    victim.write_text("#!/bin/sh\necho safe\n")
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    checkpoint["callbacks"][callback.state_key][field] = str(victim) if field == "csv_name" else "../../.."
    torch.save(checkpoint, tmp_path / "run" / "crafted.ckpt")
    before = _snapshot_of_tree(tmp_path, tmp_path / "run")
    with pytest.raises(ValueError, match=field):
        _fit(tmp_path / "run", 2, ckpt_path=str(tmp_path / "run" / "crafted.ckpt"))
    assert _snapshot_of_tree(tmp_path, tmp_path / "run") == before
    assert victim.read_text() == "#!/bin/sh\necho safe\n"


HOSTILE = [
    "{outside}/pwn-{n}",
    "../../../outside-{n}",
    "..",
    "",
    "a/b",
    '=HYPERLINK("http://x")',
    "x ; touch pwned ; #",
    "line\nbreak",
    "nul\x00byte",
    "@SUM(1)",
    "-1+2",
    "a" * 300,
    "ünïcode✓",
]


def _string_fields(value: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every string (value, or dict key marked with ``("key", k)``) in a nested state."""
    found: list[tuple] = []
    if isinstance(value, str):
        found.append(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                found.append((*path, ("key", key)))
            found += _string_fields(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found += _string_fields(item, (*path, index))
    return found


def _replace(state: Any, path: tuple, text: str) -> Any:
    """A copy of ``state`` with the string at ``path`` replaced by ``text``."""
    if not path:
        return text
    head, rest = path[0], path[1:]
    if isinstance(head, tuple):  # a dict key
        return {(text if key == head[1] else key): item for key, item in state.items()}
    if isinstance(state, dict):
        return {**state, head: _replace(state[head], rest, text)}
    items = list(state)
    items[head] = _replace(items[head], rest, text)
    return type(state)(items) if isinstance(state, tuple) else items


def test_fuzzed_state_never_writes_outside_the_log_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every string field of a real checkpoint's callback state, set to hostile strings; resume, measure, finish."""
    callback, _ = _fit(tmp_path / "run", 1, cross_layer=True)
    real = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    monkeypatch.chdir(tmp_path / "run")
    log_dir = tmp_path / "run" / "logs"
    probe, _ = _data()
    rng = random.Random(0)
    fields = _string_fields(real)
    assert len(fields) > 20
    before = _snapshot_of_tree(tmp_path, log_dir)
    refused = 0
    for n, field in enumerate(fields):
        for text in rng.sample(HOSTILE, 1):
            state = _replace(real, field, text.format(n=n, outside=tmp_path / "outside"))
            monitor = SVCCAMonitor(TinyMLP(), probe=probe, layers=LAYERS, log_dir=log_dir, cross_layer=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    monitor.load_state_dict(state)
                except ValueError:
                    refused += 1
                    continue
                monitor.start(step=2)
                monitor.measure(epoch=2, step=4)
                monitor.finish(epoch=2, step=4)
                monitor.close()
    assert _snapshot_of_tree(tmp_path, log_dir) == before
    assert refused > 0


def test_csv_cells_cannot_be_formulas_and_round_trip(tmp_path: Path) -> None:
    names = ["=1+1", "+cmd", "-x", "@SUM(A1)", "'quoted", "\tTab", "line\nbreak", "plain", 'a,b"c']
    rows = [
        {"epoch": i, "step": -1 if i == 0 else i, "layer": name, "reference": "previous", "metric": "svcca",
         "value": -0.5 + i}
        for i, name in enumerate(names)
    ]  # fmt: skip
    path = write_history_csv(rows, tmp_path / "h.csv")
    import csv

    with path.open(newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "@", "\t") or (cell[:1] == "-" and not _number(cell))]
    assert read_history_csv(path) == rows


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_validate_state_checks_layers_and_numbers() -> None:
    model = TinyMLP()
    with pytest.raises(ValueError, match="does not have.*'net.9'"):
        validate_state({"layer_order": ["net.0", "net.9"]}, model=model, layers=LAYERS)
    with pytest.raises(ValueError, match="last_measured_step"):
        validate_state({"last_measured_step": -5}, model=model, layers=LAYERS)
    with pytest.raises(ValueError, match="frozen parameters are not in the model"):
        validate_state({"freezer": {"parameters": {"net.0": ["net.7.weight"]}}}, model=model, layers=LAYERS)
    assert validate_state({"run_id": "0123abcd4567"}, model=model, layers=LAYERS)["run_id"] == "0123abcd4567"


# ----------------------------------------------------------------------------------------------------------------
# 4. Damaged or missing files degrade, never kill
# ----------------------------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 256]) + data[middle + 256 :])


@pytest.mark.parametrize("how", ["truncated", "empty", "corrupted"])
def test_damaged_snapshot_file_is_dropped_and_training_goes_on(tmp_path: Path, how: str) -> None:
    callback, _ = _fit(tmp_path, 2)
    folder = callback.monitor.store.directory
    damaged = next(folder.glob("net.2_2-*.pt"))
    _damage(damaged, how)
    resumed, caught = _fit(tmp_path, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    messages = _texts(caught)
    assert len([m for m in messages if damaged.name in m]) == 1, messages
    assert "layer 'net.2' at 2" in messages[0]
    history = resumed.history
    assert {row["epoch"] for row in history} == {0, 1, 2, 3, 4}
    previous = {(row["epoch"], row["layer"]) for row in history if row["reference"] == "previous"}
    assert (3, "net.2") not in previous and (3, "net.0") in previous and (4, "net.2") in previous


@pytest.mark.parametrize("failure", ["ENOSPC", "EROFS", "torch-zip"])
def test_snapshot_write_failure_keeps_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    real_save = torch.save

    save = failing_save(real_save, failure, hits=lambda target: "svcca_snapshots" in target)
    monkeypatch.setattr(safe_files.torch, "save", save)
    callback, caught = _fit(tmp_path, 2)
    monkeypatch.setattr(safe_files.torch, "save", real_save)
    messages = _texts(caught)
    assert len(messages) == 1 and "svcca_snapshots" in messages[0] and "cannot write" in messages[0], messages
    assert not list(tmp_path.rglob("*.partial"))
    assert {row["epoch"] for row in callback.history if row["reference"] == "previous"} == {1, 2}
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][callback.state_key]
    assert "left" in state["snapshots"]["net.0@2"]  # the snapshot itself, since its file could not be written
    resumed, caught = _fit(tmp_path, 3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not _texts(caught)
    assert {(row["epoch"], row["layer"]) for row in resumed.history if row["reference"] == "previous"} >= {
        (3, layer) for layer in LAYERS
    }


def test_csv_write_failure_warns_once_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_svcca.output import writers

    real_write = writers.write_history_csv
    calls = {"n": 0}

    def failing_write(history: Any, path: Path, **kwargs: Any) -> Path:
        calls["n"] += 1
        if calls["n"] <= 2:  # epochs 0 and 1: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(history, path, **kwargs)

    monkeypatch.setattr(writers, "write_history_csv", failing_write)
    callback, caught = _fit(tmp_path, 3)
    messages = _texts(caught)
    assert len(messages) == 1 and "svcca_history.csv" in messages[0] and "No space" in messages[0], messages
    written = read_history_csv(callback.monitor.log_dir / callback.monitor.outputs.csv_name)
    assert written == callback.history and {row["epoch"] for row in written} == {0, 1, 2, 3}


def test_csv_writer_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    write_history_csv([{"epoch": 0, "step": 0, "layer": "a", "reference": "r", "metric": "m", "value": 1.0}], path)

    def rows() -> Any:
        yield {"epoch": 1, "step": 1, "layer": "a", "reference": "r", "metric": "m", "value": 1.0}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_history_csv(rows(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["h.csv"] and len(read_history_csv(path)) == 1
