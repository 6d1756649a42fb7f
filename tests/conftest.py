"""Shared tiny models and data for the tests: sklearn digits (offline) and a small CNN LightningModule."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from digits_models import TinyDigitsCNN, digit_images
from helpers import quiet_trainer

# The models here are tiny and the test machines have few, shared cores: intra-op threads only contend (one
# thread runs the callback tests about four times faster on 2 busy cores). Results do not depend on it.
torch.set_num_threads(1)

#: The repository root, and the names a run writes there when a test forgets ``tmp_path`` (``.gitignore`` lists them).
ROOT = Path(__file__).resolve().parent.parent
RUN_OUTPUTS = ("svcca_history*.csv", "svcca_cross_layer*.csv", "svcca_snapshots", "svcca_state.pt", "lightning_logs")


def _run_outputs_in_root() -> set[str]:
    return {name for name in os.listdir(ROOT) if any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS)}


@pytest.fixture(autouse=True)
def _writes_no_run_output_into_the_repository():
    """Fail the test that writes a history, snapshots or logs into the repository root (use ``tmp_path``)."""
    before = _run_outputs_in_root()
    yield
    written = _run_outputs_in_root() - before
    assert not written, f"this test wrote {sorted(written)} into {ROOT}: give it tmp_path as its log folder"


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as ``(1797, 1, 8, 8)`` float32 images in [0, 1] and ``(1797,)`` int64 labels."""
    return digit_images()


@pytest.fixture(scope="session")
def digits_cnn() -> type[TinyDigitsCNN]:
    """The TinyDigitsCNN class (for tests that need several instances or subclasses)."""
    return TinyDigitsCNN


@pytest.fixture(scope="session")
def digits_loaders(digits) -> tuple[DataLoader, DataLoader]:
    """A training loader over 256 digits (4 batches of 64, shuffled) and a validation loader over 128 others."""
    x, y = digits
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:1628], y[1500:1628]), batch_size=64)
    return train, val


@pytest.fixture
def make_trainer(tmp_path):
    """``make_trainer(callbacks, **overrides)``: :func:`helpers.quiet_trainer` in ``tmp_path``, 2 epochs of 2 batches,
    with Lightning's default logger."""

    def make(callbacks=(), **overrides) -> pl.Trainer:
        short = {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1, "logger": True}
        return quiet_trainer(tmp_path, callbacks, **{**short, **overrides})

    return make
