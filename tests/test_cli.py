"""The lightning-svcca command on a history written the way the callback writes it."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import pytest

from lightning_svcca.cli import main
from lightning_svcca.reporting import write_history_csv


@pytest.fixture
def history_dir(tmp_path):
    # two layers; "low" reaches 0.9 at epoch 1 and stays, "high" only at epoch 3 (after a dip); "low" froze at 2
    values = {"low": [0.5, 0.92, 0.97, 1.0], "high": [0.3, 0.91, 0.6, 1.0]}
    rows = [
        {"epoch": epoch, "layer": layer, "reference": "final", "metric": "svcca", "value": value}
        for layer, series in values.items()
        for epoch, value in enumerate(series)
    ]
    rows += [
        {"epoch": epoch, "layer": "low", "reference": "frozen", "metric": "svcca", "value": float(epoch >= 2)}
        for epoch in range(4)
    ]
    write_history_csv(rows, tmp_path / "svcca_history.csv")
    return tmp_path


def test_summary_prints_convergence_epochs_and_freezes(history_dir, capsys):
    assert main(["summary", str(history_dir), "--thresholds", "0.9", "0.95"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "svcca to final (layers bottom-up)"
    assert lines[3].split() == ["low", "1", "2", "1.0000", "2"]
    assert lines[4].split() == ["high", "3", "3", "1.0000", "-"]


def test_table_and_heatmap(history_dir, capsys, tmp_path):
    assert main(["table", str(history_dir / "svcca_history.csv")]) == 0
    out = capsys.readouterr().out
    assert "0.920" in out and "0.600" in out
    assert main(["heatmap", str(history_dir), "--out", str(tmp_path / "map.png")]) == 0
    image = matplotlib.image.imread(tmp_path / "map.png")
    assert image.ndim == 3 and image.shape[2] in (3, 4)


def test_missing_history_and_unknown_reference(history_dir, tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nowhere")]) == 2
    assert "no history at" in capsys.readouterr().err
    assert main(["summary", str(history_dir), "--reference", "initial"]) == 1
    assert "available" in capsys.readouterr().out


def test_installed_entry_point_runs(history_dir):
    completed = subprocess.run(
        [sys.executable, "-m", "lightning_svcca.cli", "summary", str(history_dir)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert "svcca to final" in completed.stdout
