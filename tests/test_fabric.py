"""Lightning Fabric: a hand-driven SVCCAMonitor in a Fabric loop, with the user's layer names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from test_examples import load_example
from torch import nn

from lightning_svcca import SVCCAMonitor
from lightning_svcca.output.reporting import read_history_csv

pytestmark = pytest.mark.slow


def test_fabric_loop_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("fabric_loop")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["accuracy"] > 0.8 and "test accuracy" in out
    # the names the model's author wrote, not Fabric's `_forward_module.relu1`
    assert result["layers"] == list(example.LAYERS)
    assert read_history_csv(tmp_path / "svcca_history.csv") == result["history"]
    previous = [row for row in result["history"] if row["reference"] == "previous" and row["metric"] == "svcca"]
    assert {row["epoch"] for row in previous} == {1, 2, 3}
    assert all(0.0 < row["value"] <= 1.0 + 1e-9 for row in previous)


def _fabric_model() -> nn.Module:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 4, 3))
    model.add_module("relu", nn.ReLU())
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4 * 6 * 6, 3))
    return fabric.setup(model)


def test_fabric_names_are_the_users_with_suggestions() -> None:
    model = _fabric_model()
    probe = torch.randn(64, 1, 8, 8)
    assert SVCCAMonitor(model, probe=probe).layers == ["conv1", "fc"]  # defaults without `_forward_module.`
    assert SVCCAMonitor(model, probe=probe, layers=["conv1", "_forward_module.fc"]).layers == ["conv1", "fc"]
    with pytest.raises(ValueError, match=r"'conv_1'.*did you mean \['conv1'"):
        SVCCAMonitor(model, probe=probe, layers=["conv_1"])
