"""What the test files share beyond the digits data and models (``digits_models.py``) and the fixtures
(``conftest.py``): a quiet Trainer writing only into the test's folder, the callback's console lines, and a
``torch.save`` that fails as a full or read-only disk does.

Every test that fits builds its Trainer with :func:`quiet_trainer` (or the ``make_trainer`` fixture, which adds
short defaults), so what a fit writes lands in ``tmp_path`` and the settings a test depends on are the ones it
names.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

#: What every test Trainer has unless the test says otherwise: the CPU, one device, nothing on the console, no
#: logger or checkpoint files, no sanity check.
QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


def quiet_trainer(root: str | Path, callbacks: Iterable[pl.Callback] = (), **overrides: Any) -> pl.Trainer:
    """A Trainer that writes into ``root`` only; ``overrides`` are Trainer arguments (``max_epochs=3``,
    ``logger=CSVLogger(...)``, ``enable_checkpointing=True`` with a ``ModelCheckpoint`` among ``callbacks``)."""
    return pl.Trainer(**{**QUIET, "default_root_dir": root, "callbacks": list(callbacks), **overrides})


@contextmanager
def console_lines(callback: Any, handler: logging.Handler) -> Iterator[None]:
    """The callback's console lines also go to ``handler`` (at INFO, whatever level an earlier test left on
    Lightning's loggers; they do not propagate to pytest's ``caplog``)."""
    logger = callback._logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def failing_save(real_save: Callable[..., Any], failure: str, hits: Callable[[str], bool]) -> Callable[..., Any]:
    """``torch.save`` that, for the targets ``hits`` picks (by ``str(target)``: a target may be a buffer), leaves
    half a file and fails as a full disk would.

    ``failure``: ``"torch-zip"`` (torch's own writer error) or an ``errno`` name (``"ENOSPC"``, ``"EACCES"``,
    ``"EROFS"``); other targets are saved by ``real_save``.
    """

    def save(value: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        if not hits(str(target)):
            return real_save(value, target, *args, **kwargs)
        Path(target).write_bytes(b"half a file")  # what a full disk leaves
        if failure == "torch-zip":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        code = getattr(errno, failure)
        raise OSError(code, os.strerror(code), str(target))

    return save
