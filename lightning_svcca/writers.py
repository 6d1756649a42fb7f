"""Where the monitor's outputs go: the small writer interface, and an adapter for a plain ``SummaryWriter``.

A writer is anything with ``log_metrics(metrics: dict[str, float], step: int)``: every Lightning logger is one
as it is (TensorBoard, CSV, MLflow, W&B, in either Lightning namespace). Images (heatmaps), text (freeze events)
and the custom-scalars layout go to writers whose ``experiment`` has ``add_image``, ``add_text`` or
``add_custom_scalars``, which a TensorBoard logger's ``experiment`` (a ``SummaryWriter``) does. A plain
``torch.utils.tensorboard.SummaryWriter`` is wrapped in :class:`TensorBoardWriter`; the history CSV is written
by the monitor itself into its ``log_dir``, so no writer is needed for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["TensorBoardWriter", "Writer", "as_writers"]


@runtime_checkable
class Writer(Protocol):
    """The one method every writer has."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar values at ``step``."""


class TensorBoardWriter:
    """A ``SummaryWriter`` (or a log directory for a new one) as a writer: scalars, images, text, layouts.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or a directory to create one in.
    """

    def __init__(self, writer: Any) -> None:
        if not callable(getattr(writer, "add_scalar", None)):
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            writer = SummaryWriter(str(writer))
        self.experiment = writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One ``add_scalar`` per value."""
        for name, value in metrics.items():
            self.experiment.add_scalar(name, value, step)

    def close(self) -> None:
        """Flush and close the underlying ``SummaryWriter``."""
        self.experiment.close()


def as_writers(writers: Any) -> list[Any]:
    """Normalise the ``writers`` argument: ``None``, one writer or ``SummaryWriter``, or a list of them."""
    if writers is None:
        return []
    items = list(writers) if isinstance(writers, (list, tuple)) else [writers]
    normalised = []
    for item in items:
        if isinstance(item, Writer):
            normalised.append(item)
        elif callable(getattr(item, "add_scalar", None)):
            normalised.append(TensorBoardWriter(item))
        else:
            raise TypeError(
                "writers must be Lightning loggers, objects with log_metrics(metrics, step), or a TensorBoard"
                f" SummaryWriter; got {type(item).__name__}"
            )
    return normalised
