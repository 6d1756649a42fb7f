"""The end-to-end freeze benchmark's quick mode runs every variant and prints its table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "freeze_wallclock.py"


@pytest.mark.slow
def test_quick_mode_runs_every_variant(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("freeze_wallclock", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["freeze_wallclock"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("freeze_wallclock", None)
    results = module.main(["--quick", "--threads", "1", "--root", str(tmp_path)])
    assert set(results["a"]) == {"no callback", "convergence (defaults)", "linear schedule", "linear schedule + cache"}
    assert set(results["b"]) == {
        "no callback",
        "convergence (defaults)",
        "convergence + cache",
        "fine-tuning preset, no cache",
        "fine-tuning preset",
    }
    # the linear schedule freezes the stages at epochs 1 and 2 of 3; stage3's turn, 3, is the fit's end (held)
    assert results["a"]["linear schedule"][0].frozen == {"stage1": 1, "stage2": 2}
    table = capsys.readouterr().out
    assert "(a) from scratch" in table and "(b) fine-tuning" in table and "speedup" in table
