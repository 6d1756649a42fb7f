"""The long-run benchmark script runs end to end on a tiny setting and prints its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_long_run_prints_sizes_and_ratios():
    command = [sys.executable, str(ROOT / "benchmarks" / "long_run.py"), "--epochs", "1", "3", "--batches", "2"]
    command += ["--batch-size", "16", "--probe", "96"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:2] == ["epoch", "ckpt"])
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in rows] == ["1", "3"]
    first, last = (list(map(float, row[1:])) for row in rows)
    # ratios to the first row: 1.00 there, and the checkpoint ratio matches the printed sizes
    assert first[-4:] == [1.0, 1.0, 1.0, 1.0]
    assert last[-4] == pytest.approx(last[0] / first[0], abs=0.01)
    # a checkpoint holds at least the callback's state; measurements took time
    assert first[0] > first[1] > 0 and first[4] > 0
