"""Resuming with other layers, references, metrics or probe continues the history; nothing is dropped silently.

Each test fits a tiny MLP for 2 epochs with a ``last.ckpt``, then resumes from it for 2 more epochs with one
setting changed (so the callback's ``state_key`` differs from the checkpoint's) and checks the history and the
warnings.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.integrations.resume import describe_changes, orphaned_state

from helpers import quiet_trainer

INPUTS = torch.Generator().manual_seed(0)
X = torch.randn(320, 16, generator=INPUTS)
Y = torch.randint(0, 4, (320,), generator=INPUTS)
PROBE = X[:256]


class _MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, callback: SVCCACallback, epochs: int, ckpt_path: str | None = None) -> list[str]:
    """Fit (or resume) and return the monitor's warnings."""
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = quiet_trainer(
        root, [callback, saver], max_epochs=epochs, limit_train_batches=2, enable_checkpointing=True
    )
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_MLP(), loader, ckpt_path=ckpt_path)
    return [str(w.message) for w in caught if issubclass(w.category, SVCCAMonitorWarning)]


def _resume(tmp_path: Path, before: dict[str, Any], after: dict[str, Any]) -> tuple[list, list, list[str]]:
    """History of the first fit, history after resuming with ``after``'s settings, and the resume's warnings."""
    first = SVCCACallback(**before)
    assert _fit(tmp_path, first, 2) == []
    resumed = SVCCACallback(**after)
    assert resumed.state_key != first.state_key
    messages = _fit(tmp_path, resumed, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert any("resumes the history saved with other settings" in message for message in messages), messages
    return first.history, resumed.history, messages


def _keys(rows: list[dict[str, Any]], reference: str | None = None) -> set[tuple[int, str, str, str]]:
    return {
        (row["epoch"], row["layer"], row["reference"], row["metric"])
        for row in rows
        if reference is None or row["reference"] == reference
    }


def _earlier_rows_kept(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    """Every row of the first fit's epochs (except its end-of-fit ``final`` rows, redone at the end) is kept."""
    kept = {key: row["value"] for row in new if (key := _keys([row]).pop())[2] != "final"}
    for row in old:
        if row["reference"] != "final":
            assert kept[_keys([row]).pop()] == row["value"], row
    assert sorted({row["epoch"] for row in new if row["reference"] == "dims"}) == [0, 1, 2, 3, 4]


def test_resume_with_other_layers_keeps_the_kept_and_removed_layers_rows(tmp_path: Path) -> None:
    old, new, messages = _resume(
        tmp_path, {"probe": PROBE, "layers": ["net.0", "net.2"]}, {"probe": PROBE, "layers": ["net.0", "net.4"]}
    )
    _earlier_rows_kept(old, new)
    previous = _keys(new, "previous")
    assert {(3, "net.0", "previous", "svcca"), (4, "net.0", "previous", "svcca")} <= previous  # continues
    assert (3, "net.4", "previous", "svcca") not in previous  # new: nothing earlier to compare with
    assert (4, "net.4", "previous", "svcca") in previous
    assert not [row for row in new if row["layer"] == "net.2" and row["epoch"] > 2]  # removed: earlier rows only
    assert any("layers: ['net.0', 'net.2'] -> ['net.0', 'net.4']" in message for message in messages)
    (note,) = [message for message in messages if "new layers" in message]
    assert "new layers ['net.4']" in note and "no longer monitored ['net.2']" in note


def test_resume_with_another_reference_keeps_the_history_and_adds_the_reference(tmp_path: Path) -> None:
    old, new, messages = _resume(
        tmp_path, {"probe": PROBE}, {"probe": PROBE, "reference": ["previous", "initial", "final"]}
    )
    _earlier_rows_kept(old, new)
    assert {(3, "net.0", "initial", "svcca"), (4, "net.4", "initial", "svcca")} <= _keys(new, "initial")
    assert {(4, "net.2", "previous", "svcca")} <= _keys(new, "previous")
    assert len(messages) == 1 and "reference: ['previous', 'final'] -> ['previous', 'initial', 'final']" in messages[0]


def test_resume_with_metrics_needing_more_directions_restarts_snapshots_and_keeps_history(tmp_path: Path) -> None:
    old, new, messages = _resume(
        tmp_path,
        {"probe": PROBE, "reference": ["previous", "initial"]},
        {"probe": PROBE, "reference": ["previous", "initial"], "metrics": ["svcca", "linear_cka"]},
    )
    _earlier_rows_kept(old, new)
    assert [row for row in new if row["epoch"] == 0] == [row for row in old if row["epoch"] == 0]  # no second epoch 0
    (restart,) = [message for message in messages if "earlier snapshots are dropped" in message]
    assert "metrics=['svcca', 'linear_cka'] need snapshots with more directions" in restart
    assert "incomparable with earlier epochs: ['previous', 'initial']" in restart
    assert not [row for row in new if row["epoch"] > 2 and row["reference"] == "initial"]  # its snapshot is gone
    assert (3, "net.0", "previous", "svcca") not in _keys(new)  # epoch 2's snapshot is gone too
    assert {(4, "net.0", "previous", "svcca"), (4, "net.0", "previous", "linear_cka")} <= _keys(new)


def test_resume_with_another_probe_restarts_snapshots_and_keeps_history(tmp_path: Path) -> None:
    old, new, messages = _resume(tmp_path, {"probe": PROBE}, {"probe": X[:200]})
    _earlier_rows_kept(old, new)
    assert any("probe: 'tensor:(256, 16)' -> 'tensor:(200, 16)'" in message for message in messages)
    (restart,) = [message for message in messages if "earlier snapshots are dropped" in message]
    assert "the probe differs" in restart and "incomparable with earlier epochs: ['previous']" in restart
    assert (3, "net.0", "previous", "svcca") not in _keys(new)
    assert (4, "net.0", "previous", "svcca") in _keys(new)


class _Named:
    def __init__(self, key: str) -> None:
        self.state_key = key


def test_two_unclaimed_states_raise_an_error_naming_both() -> None:
    states = {"_Named{'layers': ['a']}": {}, "_Named{'layers': ['b']}": {}}
    ours = _Named("_Named{'layers': ['c']}")
    with pytest.raises(ValueError, match="give each callback the layers") as error:
        orphaned_state(ours, [ours], states)
    assert "['a']" in str(error.value) and "['b']" in str(error.value)
    assert orphaned_state(ours, [ours], {"Other{}": {}}) is None  # a checkpoint without this callback
    claimed = _Named("_Named{'layers': ['a']}")
    assert orphaned_state(ours, [ours, claimed], states) == ("_Named{'layers': ['b']}", {})
    assert describe_changes("X{'a': 1, 'b': 2}", "X{'a': 1, 'b': 3}") == "b: 2 -> 3"
