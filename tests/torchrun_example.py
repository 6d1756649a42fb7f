"""Launching an example under ``torchrun`` (gloo, CPU) from a test, as a user would, and reading its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(example: Path, out: Path, processes: int, *args: str) -> dict:
    """Run ``example --log-dir out --quick *args`` on ``processes`` processes; rank zero's ``summary.json``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for variable in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)  # a test run inside torchrun must not hand its rendezvous to the child
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += [str(example), "--log-dir", str(out), "--quick", *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    return json.loads((out / "summary.json").read_text())
