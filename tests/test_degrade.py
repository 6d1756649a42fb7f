"""Optional parts degrade, never stop training: the prefix cache on a full, read-only or failing disk, a writer
that raises, a symbolic link planted in the log folder. Real fits of the digits CNN (its prefix cache spills past
a small budget); the disk cases on a small tmpfs where this machine lets us mount one (root), else skipped."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback
from lightning_svcca.core import safe_files
from lightning_svcca.core.safe_files import FileTrustWarning
from lightning_svcca.freezing.prefix_cache import PrefixCacheWarning
from lightning_svcca.output.writers import WriterWarning

from digits_models import DigitsCNN, digits_tensors
from helpers import failing_save

LAYERS = ["relu1", "relu2", "relu3", "fc2"]
PER_SAMPLE = 16 * 8 * 8 * 4  # relu2's output: 16 channels of 8x8 float32


def _policy() -> FreezePolicy:
    """relu1 frozen after epoch 1, relu2 after 2; the cache holds 100 samples in memory, the rest spill."""
    return FreezePolicy(
        mode="schedule", schedule={"relu1": 1, "relu2": 2}, cache_outputs=True, cache_max_bytes=100 * PER_SAMPLE
    )


def _fit(root: Path, *, logger: Any = None, epochs: int = 5, freeze: FreezePolicy | None = None) -> tuple[Any, list]:
    """Fit the digits CNN in ``root`` (log folder ``root/logs/version_0``); the callback and the warnings."""
    (x_train, y_train), (x_probe, _), _ = digits_tensors()
    loader = DataLoader(
        TensorDataset(x_train[:320], y_train[:320]), batch_size=64, shuffle=True, generator=torch.Generator()
    )
    callback = SVCCACallback(probe=x_probe[:128], layers=LAYERS, reference=["previous"], freeze=freeze)
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        accelerator="cpu",
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger if logger is not None else CSVLogger(root, name="logs", version=0),
        enable_checkpointing=False,
    )
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsCNN(), loader)
    return callback, caught


def _of(caught: list, category: type) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def _epochs(callback: SVCCACallback) -> set[int]:
    return {row["epoch"] for row in callback.history if row["reference"] == "previous"}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``mount(folder, size, read_only=False)``: a small tmpfs at ``folder`` (skips where mounting is impossible)."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str = "2m", *, read_only: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()[:120]}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ----------------------------------------------------------------------------------------------------------------
# The prefix cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["torch-zip", "ENOSPC", "EACCES"])
def test_a_spill_that_fails_turns_the_cache_off_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    real_save = torch.save

    save = failing_save(real_save, failure, hits=lambda target: "prefix_" in Path(target).name)
    monkeypatch.setattr(safe_files.torch, "save", save)
    callback, caught = _fit(tmp_path, freeze=_policy())
    messages = _of(caught, PrefixCacheWarning)
    assert len(messages) == 1 and "turned off" in messages[0] and "spill file" in messages[0], messages
    assert _epochs(callback) == {1, 2, 3, 4, 5}
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("prefix_cache_*"))


def test_full_disk_the_cache_and_snapshots_give_way(tmp_path: Path, tmpfs: Any) -> None:
    """The run's folder on a 2 MiB tmpfs, nearly full: spills and snapshot writes fail, the fit finishes."""
    root = tmpfs(tmp_path / "disk", "2m")
    (root / "filler").write_bytes(b"\0" * (2 * 2**20 - 96 * 2**10))  # about 96 KiB left
    callback, caught = _fit(root, freeze=_policy(), logger=False)  # Lightning's CSVLogger itself dies there
    assert _epochs(callback) == {1, 2, 3, 4, 5}
    messages = _of(caught, PrefixCacheWarning)
    assert len(messages) == 1 and "spill file" in messages[0], messages
    assert not list(root.rglob("*.partial")) and not list(root.rglob("prefix_cache_*"))


def test_read_only_snapshot_folder_spills_elsewhere(tmp_path: Path, tmpfs: Any) -> None:
    """The snapshot folder read-only (a read-only mount: root ignores file modes): warned once, never written in."""
    log_dir = tmp_path / "logs" / "version_0"
    snapshots = tmpfs(log_dir / "svcca_snapshots", "1m", read_only=True)
    callback, caught = _fit(tmp_path, freeze=_policy())
    assert _epochs(callback) == {1, 2, 3, 4, 5}
    file_warnings = _of(caught, FileTrustWarning)
    assert len(file_warnings) == 1 and "svcca_snapshots" in file_warnings[0], file_warnings
    assert not _of(caught, PrefixCacheWarning)  # the cache spilled to a temporary folder instead
    cache = callback.monitor.freezing.freezer
    assert cache.cache is None  # closed at the end of the fit
    assert not any(snapshots.iterdir())


def test_spill_folder_never_inside_a_folder_found_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    folders: list[Path] = []

    def read_only_save(value: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if "svcca_snapshots" in str(target) and "prefix_" not in Path(target).name:
            raise OSError(30, "Read-only file system", str(target))
        if "prefix_" in Path(target).name:
            folders.append(Path(target).parent)
        return real_save(value, target, *args, **kwargs)

    monkeypatch.setattr(safe_files.torch, "save", read_only_save)
    callback, caught = _fit(tmp_path, freeze=_policy())
    assert _epochs(callback) == {1, 2, 3, 4, 5} and not _of(caught, PrefixCacheWarning)
    assert folders and not any("svcca_snapshots" in str(folder) for folder in folders), folders


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------


class _FailingLogger(Logger):
    """A logger whose ``log_metrics`` raises from its second call on (a full disk, a server gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @property
    def name(self) -> str:
        return "failing"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Any, step: Any = None) -> None:
        self.calls += 1
        if self.calls > 1:
            raise OSError(28, "No space left on device")


def test_a_writer_that_raises_is_warned_about_once_and_skipped(tmp_path: Path) -> None:
    logger = _FailingLogger()
    callback, caught = _fit(tmp_path, logger=[logger, CSVLogger(tmp_path, name="logs", version=0)])
    messages = _of(caught, WriterWarning)
    assert len(messages) == 1 and "_FailingLogger" in messages[0] and "No space" in messages[0], messages
    assert logger.calls == 2 and _epochs(callback) == {1, 2, 3, 4, 5}


def test_tensorboard_event_writer_failing_is_skipped(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="logs", version=0)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")  # what the event writer's thread left behind

    logger.experiment.add_scalar = broken
    logger.experiment.add_image = broken
    callback, caught = _fit(tmp_path, logger=logger, epochs=3)
    assert len(_of(caught, WriterWarning)) == 1
    assert _epochs(callback) == {1, 2, 3}


# ----------------------------------------------------------------------------------------------------------------
# Symbolic links in the log folder
# ----------------------------------------------------------------------------------------------------------------


def test_a_planted_snapshot_folder_link_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    log_dir = tmp_path / "logs" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "svcca_snapshots").symlink_to(outside)
    callback, caught = _fit(tmp_path, freeze=_policy())
    messages = _of(caught, FileTrustWarning)
    assert len(messages) == 1 and "symbolic link" in messages[0] and str(outside) in messages[0], messages
    assert _epochs(callback) == {1, 2, 3, 4, 5}
    assert not list(outside.rglob("*"))
    assert (log_dir / "svcca_history.csv").is_file()


def test_a_tensorboard_writer_that_fails_to_close_only_warns(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from lightning_svcca import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path / "tb")
    real_close = writer.experiment.close

    def broken() -> None:
        real_close()
        raise OSError(28, "No space left on device")

    writer.experiment.close = broken
    with pytest.warns(WriterWarning, match="closing the TensorBoard writer failed"):
        writer.close()
