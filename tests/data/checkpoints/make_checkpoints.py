"""Make the checkpoint fixtures of tests/test_checkpoint_compat.py with an earlier version of lightning_svcca.

Each fixture is a ``last.ckpt`` of a 4-epoch fit of :class:`TinyMLP` on fixed-seed synthetic data, with an
:class:`~lightning_svcca.SVCCACallback` monitoring three layers against ``"previous"`` and ``"initial"`` and a
schedule :class:`~lightning_svcca.FreezePolicy` that freezes ``net.0`` after epoch 2 and ``net.2`` after epoch 3. So
the checkpoint holds a history, measured epochs, freeze state and snapshots, saved as ``NAME.last.pt`` (the fit's
``last.ckpt``, renamed so that it does not read as a generated file). Beside it goes ``NAME.json``: the history
and freezes as the old code produced them (what a resume must keep).

Versions that keep snapshots as files under the log directory (``svcca_snapshots/<run id>/``, from the callback's
persistent snapshot store on) write their path into the checkpoint. The fit runs in a temporary working directory
with the relative ``default_root_dir`` :data:`ROOT_DIR`, so that path is relative; the files the checkpoint names are
copied to ``NAME.snapshots/`` and the JSON's ``snapshot_folder`` says where a test puts them back (relative to its
working directory). Versions that keep snapshots inside the checkpoint need no folder.

Regenerate (from the repository root; the old commits are checked out as extra worktrees and removed after)::

    git worktree add /tmp/v01 8c69339     # v0.1: the first landed release
    PYTHONPATH=/tmp/v01 python tests/data/checkpoints/make_checkpoints.py v0.1-8c69339
    git worktree add /tmp/pre18 3340b37   # the code before the subpackage layout (labelled v0.2)
    PYTHONPATH=/tmp/pre18 python tests/data/checkpoints/make_checkpoints.py v0.2-3340b37
    git worktree remove /tmp/v01 && git worktree remove /tmp/pre18

This module only uses the API that all those versions share (``SVCCACallback``, ``FreezePolicy`` from the package
root), so the test imports its model, data and callback settings to resume with the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_svcca
from lightning_svcca import FreezePolicy, SVCCACallback

#: Where the fixtures live.
HERE = Path(__file__).resolve().parent
#: Monitored layers, bottom-up.
LAYERS = ("net.0", "net.2", "net.4")
#: Completed epochs after which a layer freezes (``net.4`` is the kept top layer).
SCHEDULE = {"net.0": 2, "net.2": 3}
#: Epochs of the fit that made the fixture.
EPOCHS = 4
#: The fit's relative ``default_root_dir`` (run from a temporary working directory).
ROOT_DIR = "run"
_FEATURES, _HIDDEN, _CLASSES = 8, 12, 3


class TinyMLP(pl.LightningModule):
    """Three linear layers with tanh between them, trained by SGD with momentum (a few KB of weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(_FEATURES, _HIDDEN),
            nn.Tanh(),
            nn.Linear(_HIDDEN, _HIDDEN),
            nn.Tanh(),
            nn.Linear(_HIDDEN, _CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of ``x`` ``(N, 8)``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of one batch."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum (its buffers are in the checkpoint too)."""
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def train_loader() -> DataLoader:
    """192 fixed-seed samples whose label is the argmax of a fixed linear map: 3 batches of 64, in order."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, _FEATURES, generator=generator)
    labels = (x @ torch.randn(_FEATURES, _CLASSES, generator=generator)).argmax(dim=1)
    return DataLoader(TensorDataset(x, labels), batch_size=64)


def callback_kwargs() -> dict[str, Any]:
    """The callback's settings; the same ones give the same checkpoint key in every version."""
    probe = torch.randn(96, _FEATURES, generator=torch.Generator().manual_seed(1))
    return {
        "probe": probe,
        "layers": list(LAYERS),
        "reference": ("previous", "initial"),
        "metrics": ("svcca", "linear_cka"),
        "freeze": FreezePolicy(mode="schedule", schedule=dict(SCHEDULE)),
        "baseline": False,
    }


def make_trainer(callbacks: list[pl.Callback], max_epochs: int, root_dir: str | Path) -> pl.Trainer:
    """A quiet single-process CPU Trainer that keeps ``last.ckpt`` under ``root_dir/checkpoints``."""
    checkpoint = ModelCheckpoint(dirpath=Path(root_dir) / "checkpoints", save_last=True, save_top_k=0)
    return pl.Trainer(
        default_root_dir=root_dir,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, checkpoint],
    )


def history_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history as plain JSON rows (epoch, layer, reference, metric, value)."""
    keys = ("epoch", "layer", "reference", "metric")
    return [{**{key: row[key] for key in keys}, "value": float(row["value"])} for row in history]


def make_fixture(name: str, commit: str, out: Path) -> dict[str, Any]:
    """Fit in a temporary working directory, then copy ``last.ckpt`` (and any snapshot files) and write the JSON."""
    previous_cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        try:
            torch.manual_seed(0)
            callback = SVCCACallback(**callback_kwargs())
            make_trainer([callback], EPOCHS, ROOT_DIR).fit(TinyMLP(), train_dataloaders=train_loader())
            shutil.copyfile(Path(ROOT_DIR) / "checkpoints" / "last.ckpt", out / f"{name}.last.pt")
            folder = _copy_snapshots(out / f"{name}.last.pt", callback.state_key, out / f"{name}.snapshots")
        finally:
            os.chdir(previous_cwd)
    expected = {
        "name": name,
        "commit": commit,
        "package_version": lightning_svcca.__version__,
        "pytorch_lightning": pl.__version__,
        "torch": torch.__version__,
        "state_key": callback.state_key,
        "epochs": EPOCHS,
        "layers": list(callback.layers),
        "frozen": dict(callback.frozen),
        "measured": sorted({int(row["epoch"]) for row in callback.history}),
        "snapshot_folder": folder,
        "history": history_rows(callback.history),
    }
    (out / f"{name}.json").write_text(json.dumps(expected, indent=1) + "\n")
    return expected


def _copy_snapshots(checkpoint: Path, state_key: str, target: Path) -> str | None:
    """Copy the snapshot files the checkpoint names to ``target``; returns their folder as the checkpoint has it."""
    snapshots = torch.load(checkpoint, weights_only=False)["callbacks"][state_key].get("snapshots", {})
    if "" not in snapshots:
        return None  # snapshots inside the checkpoint
    folder = Path(snapshots[""]["folder"])
    if folder.is_absolute():
        raise RuntimeError(f"the snapshot folder {folder} should be relative to the fit's working directory")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for key, entry in snapshots.items():
        if key:
            shutil.copyfile(folder / entry["name"], target / entry["name"])
    return folder.as_posix()


def main(argv: list[str] | None = None) -> None:
    """Make one fixture with the lightning_svcca on ``PYTHONPATH``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="fixture name, e.g. v0.1-8c69339 (the commit is the part after the last '-')")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for NAME.last.pt and NAME.json")
    args = parser.parse_args(argv)
    print(f"lightning_svcca from {Path(lightning_svcca.__file__).parent}", file=sys.stderr)
    expected = make_fixture(args.name, args.name.rpartition("-")[2], args.out.resolve())
    print(f"{args.name}: epochs {expected['measured']}, frozen {expected['frozen']}", file=sys.stderr)


if __name__ == "__main__":
    main()
