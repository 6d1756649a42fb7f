"""A resumed run cleans what its killed process left (with the bytes said), a finished run resumed returns its whole
history, and a history file left by a run killed before its first checkpoint is pointed out."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_trust import _fit

from lightning_svcca.monitoring.leftovers import clean_leftovers
from lightning_svcca.output.reporting import read_history_csv

DEAD_PID = 2**31 - 2  # above any pid_max: no such process


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records() -> list[str]:
    """Info messages of the loggers the monitor writes to (Lightning's own namespace does not propagate)."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_svcca")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.messages
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_resume_removes_a_killed_processs_spill_folders_and_partial_files(tmp_path: Path, records: list) -> None:
    _fit(tmp_path, 2)
    log_dir = tmp_path / "logs" / "version_0"
    run_folder = next((log_dir / "svcca_snapshots").iterdir())
    spill = run_folder / "prefix_cache_0badc0de"
    spill.mkdir()
    (spill / "prefix_000000.pt").write_bytes(b"\0" * 2**20)
    partial = run_folder / f"net.0_2-0000.pt.{DEAD_PID}.abcd1234.partial"
    partial.write_bytes(b"\0" * 1000)
    csv_partial = log_dir / f"svcca_history.csv.{DEAD_PID}.abcd1234.partial"
    csv_partial.write_text("epoch,")
    alive = log_dir / "svcca_history.csv.1.abcd1234.partial"  # pid 1 is alive: another process's write
    alive.write_text("epoch,")
    other_run = log_dir / f"svcca_history-7.csv.{DEAD_PID}.abcd1234.partial"  # not this run's file
    other_run.write_text("epoch,")
    records.clear()
    resumed, _ = _fit(tmp_path, 3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not spill.exists() and not partial.exists() and not csv_partial.exists()
    assert alive.exists() and other_run.exists()
    lines = [m for m in records if "killed process" in m]
    assert len(lines) == 1 and "3 spill folder(s) and partial file(s), 1.0 MiB" in lines[0], lines
    assert {row["epoch"] for row in resumed.history} == {0, 1, 2, 3}


def test_clean_leftovers_reports_nothing_in_a_clean_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "net.0_1-0000.pt").write_bytes(b"snapshot")
    assert clean_leftovers(tmp_path / "run", tmp_path, "svcca_history.csv") == ([], 0)
    assert (tmp_path / "run" / "net.0_1-0000.pt").exists()


def test_a_finished_run_resumed_returns_its_whole_history(tmp_path: Path) -> None:
    first, _ = _fit(tmp_path, 2)
    assert any(row["reference"] == "final" for row in first.history)
    resumed, _ = _fit(tmp_path, 2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.history == first.history
    assert read_history_csv(tmp_path / "logs" / "version_0" / "svcca_history.csv") == resumed.history


def test_a_history_left_by_a_run_killed_before_its_checkpoint_is_pointed_out(tmp_path: Path, records: list) -> None:
    log_dir = tmp_path / "logs" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "svcca_history.csv").write_text("epoch,step,layer,reference,metric,value\n0,0,net.0,dims,svcca,3\n")
    _fit(tmp_path, 1)
    lines = [m for m in records if "svcca_history-1.csv" in m]
    assert len(lines) == 1 and "killed before its first checkpoint" in lines[0], lines
    assert (log_dir / "svcca_history-1.csv").is_file()
