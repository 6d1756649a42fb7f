"""Runtime: what a training framework gives the monitor (collectives, rank, precision context, after-freeze hook).

The adapters (:mod:`lightning_svcca.integrations`) build one from their trainer; the defaults describe a single
process with no framework, as in a plain training loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_svcca.pipeline.snapshot import Collective, LocalCollective

__all__ = ["Runtime"]


def _identity(value: Any) -> Any:
    return value


def console_logger() -> logging.Logger:
    """The package's logger, shown on the console at INFO when nothing else handles logging.

    Freeze lines and the reasons freezing waits are INFO: without a handler Python shows only warnings, so under
    a plain loop or the HuggingFace ``Trainer`` they were hidden. As Lightning does for its own logger, a console
    handler is added only when the root logger has none (an application that configures logging keeps control).
    """
    logger = logging.getLogger("lightning_svcca")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@dataclass
class Runtime:
    """What the monitor needs from the training framework; the defaults describe a single process.

    Attributes:
        collective: sums and row gathers over all processes (sharded probes).
        is_global_zero: whether this process writes outputs and decides freezes.
        broadcast: rank zero's object on every process (freeze decisions).
        forward_context: a context manager factory wrapped around each probe pass (e.g. a precision context).
        convert_input: applied to each probe chunk before the forward pass (e.g. casting floating inputs to a
            ``bf16-true`` model's dtype, as the trainer does with training batches).
        after_freeze: called on every process after layers were frozen (e.g. to rebuild a DDP wrapper).
        max_epochs: the run's length in epochs, for the ``LinearSchedule`` freeze rule and cross-layer moments.
        max_steps: the run's length in optimizer steps, for cross-layer moments when measuring by steps.
        logger: where freeze events are logged as text.
        probe_as_training: whether the probe's forward pass computes as the training step's does (``False`` under
            mixed precision with a full-precision probe): only then may the frozen-prefix cache serve it.
    """

    collective: Collective = field(default_factory=LocalCollective)
    is_global_zero: bool = True
    broadcast: Callable[[Any], Any] = _identity
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None
    convert_input: Callable[[Any], Any] | None = None
    after_freeze: Callable[[], None] | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    logger: logging.Logger = field(default_factory=console_logger)
    probe_as_training: bool = True

    @classmethod
    def distributed(cls, model: nn.Module, **fields: Any) -> Runtime:
        """A plain ``torch.distributed`` loop's runtime (default process group): see ``docs/distributed.md``.

        Arguments as for :func:`~lightning_svcca.monitoring.process_group.distributed_runtime`.
        """
        from lightning_svcca.monitoring.process_group import distributed_runtime

        return distributed_runtime(model, **fields)
