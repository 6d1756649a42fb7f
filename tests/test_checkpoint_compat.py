"""Checkpoints written by earlier versions resume with today's code and continue their history.

The fixtures in tests/data/checkpoints/ (made by make_checkpoints.py there, with the old commits) are 4-epoch fits
of a tiny MLP with three monitored layers, ``"previous"`` and ``"initial"`` references and a schedule freeze of
``net.0`` (epoch 2) and ``net.2`` (epoch 3). Each test resumes one for 2 more epochs from a copy in ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_svcca import SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.output.reporting import upgrade_freeze_rows

FIXTURES = Path(__file__).parent / "data" / "checkpoints"
EXTRA_EPOCHS = 2
#: Lightning's warning when a checkpoint holds callback state that no callback of the Trainer claims.
MISSING_STATE = "callbacks used to create the checkpoint"
Key = tuple[int, str, str, str]


def _generator() -> Any:
    """make_checkpoints.py as a module: the model, data, callback settings and Trainer of the fixtures."""
    spec = importlib.util.spec_from_file_location("checkpoint_fixtures", FIXTURES / "make_checkpoints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


def _values(rows: list[dict[str, Any]]) -> dict[Key, float]:
    return {(int(row["epoch"]), row["layer"], row["reference"], row["metric"]): row["value"] for row in rows}


def _resume(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, with_snapshots: bool = True) -> dict:
    """Copy fixture ``name`` to ``tmp_path`` (its snapshot folder too, when it has one and asked), resume it for
    :data:`EXTRA_EPOCHS` epochs there, and return what the checks need."""
    expected = json.loads((FIXTURES / f"{name}.json").read_text())
    shutil.copyfile(FIXTURES / f"{name}.last.pt", tmp_path / "fixture.ckpt")
    if with_snapshots and expected["snapshot_folder"]:
        shutil.copytree(FIXTURES / f"{name}.snapshots", tmp_path / expected["snapshot_folder"])
    monkeypatch.chdir(tmp_path)  # the snapshot folder's path in the checkpoint is relative
    callback = SVCCACallback(**GENERATOR.callback_kwargs())
    model = GENERATOR.TinyMLP()
    trainer = GENERATOR.make_trainer([callback], expected["epochs"] + EXTRA_EPOCHS, GENERATOR.ROOT_DIR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=GENERATOR.train_loader(), ckpt_path="fixture.ckpt")
    weights = torch.load("fixture.ckpt", weights_only=False)["state_dict"]
    return {"expected": expected, "callback": callback, "model": model, "warnings": caught, "weights": weights}


def _check_continued(run: dict, *, references: dict[int, set[str]]) -> None:
    """Old rows kept to 1e-6, epochs going on without a gap, freezes kept; ``references`` per new epoch."""
    expected, callback, model = run["expected"], run["callback"], run["model"]
    assert callback.state_key == expected["state_key"]
    # the old freeze rows (metric "svcca", reference "frozen") are loaded under their own metric, "freeze"
    old, now = _values(upgrade_freeze_rows(expected["history"])), _values(callback.history)
    last = expected["epochs"]
    assert {key for key in now if key[0] <= last} == set(old), "the old epochs' rows changed"
    for key, value in old.items():
        assert now[key] == pytest.approx(value, abs=1e-6), key
    epochs = [int(row["epoch"]) for row in callback.history]
    assert epochs == sorted(epochs), "the history restarted"
    assert sorted(set(epochs)) == list(range(last + EXTRA_EPOCHS + 1))
    assert callback.frozen == expected["frozen"]
    for layer in expected["layers"]:
        trainable = layer not in expected["frozen"]
        module = model.get_submodule(layer)
        assert all(p.requires_grad == trainable for p in module.parameters()), layer
        if not trainable:  # frozen since the old run: the weights are the checkpoint's
            assert torch.equal(module.weight, run["weights"][f"{layer}.weight"]), layer
    for epoch, names in references.items():
        for layer in expected["layers"]:
            frozen = float(layer in expected["frozen"])
            assert now[(epoch, layer, "frozen", "freeze")] == frozen
            found = {key[2] for key in now if key[:2] == (epoch, layer)} - {"frozen", "dims"}
            assert found == names, (epoch, layer)
    assert not [w for w in run["warnings"] if MISSING_STATE in str(w.message)]


def _monitor_warnings(run: dict) -> list[str]:
    return [str(w.message) for w in run["warnings"] if issubclass(w.category, SVCCAMonitorWarning)]


@pytest.mark.parametrize("name", ["v0.1-8c69339", "v0.2-3340b37"])
def test_resume_continues_history(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every snapshot the checkpoint needs, the new epochs compare with ``previous`` and ``initial`` too."""
    run = _resume(name, tmp_path, monkeypatch)
    both = {"previous", "initial"}
    _check_continued(run, references={5: both, 6: both})
    assert _monitor_warnings(run) == []


def test_resume_without_snapshot_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot files gone (v0.2 kept them beside the run): the history and freezes still continue; comparisons
    with the lost epochs (the last one and the initial one, which is not re-taken) are skipped, with a warning."""
    run = _resume("v0.2-3340b37", tmp_path, monkeypatch, with_snapshots=False)
    _check_continued(run, references={5: set(), 6: {"previous"}})
    (message,) = _monitor_warnings(run)
    assert "snapshot files of 6 layer/epoch pairs are gone" in message
