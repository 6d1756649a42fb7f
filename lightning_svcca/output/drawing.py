"""Heatmap pictures drawn and written off the training thread: one worker thread, results handed back in order.

Drawing a heatmap costs about 0.1 s of matplotlib, as much as an epoch of a small model, and handing the picture to
TensorBoard some more (``add_image`` resamples and PNG-encodes it on the thread that calls it).
:class:`Drawer` runs each drawing on a single background thread (matplotlib's object API with the Agg canvas: every
picture has its own ``Figure``, no pyplot state, so a thread is safe), then the drawing's ``write`` (the reporter
sends the image to the writers that take images: TensorBoard's ``SummaryWriter`` queues events under a lock, so a
second thread is safe), and the training thread picks the finished drawings up at its next call
(:meth:`Drawer.finished`), with the errors their writes raised: what to do about a failed writer is decided there.
With ``background=False`` each picture is drawn and written at once, in the caller's thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_svcca.output.reporting import HeatmapFigure

__all__ = ["Drawer", "Drawing", "Drawn", "Write"]


#: Sends a drawn picture on: ``write(image)`` returns the errors it met (each with what raised it), not raising.
Write = Callable[[np.ndarray], list[tuple[Any, Exception]]]


@dataclass(frozen=True)
class Drawn:
    """A finished picture: the image, and the errors its ``write`` met (``(what raised, error)`` pairs)."""

    image: np.ndarray
    errors: list[tuple[Any, Exception]]


@dataclass(frozen=True)
class Drawing:
    """One picture asked for: its name, step and columns, and the :class:`Drawn` result once drawn and written."""

    name: str
    step: int
    epochs: tuple[int, ...]
    result: Future


class Drawer:
    """Draws heatmap figures (one per name, reused) on a background thread, or at once.

    Args:
        background: draw on a worker thread (the training thread only queues); ``False``: draw when asked.
    """

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._figures: dict[str, HeatmapFigure] = {}
        self._pending: list[Drawing] = []
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._seconds = 0.0

    @property
    def seconds(self) -> float:
        """Seconds spent drawing so far (finished drawings, and what :meth:`add_seconds` counted)."""
        with self._lock:
            return self._seconds

    def add_seconds(self, seconds: float) -> None:
        """Count work done for a picture outside the drawing itself (its rows, computed by the caller)."""
        with self._lock:
            self._seconds += seconds

    def busy(self, name: str) -> bool:
        """Whether a picture of ``name`` is still being drawn (or written)."""
        return any(drawing.name == name and not drawing.result.done() for drawing in self._pending)

    def draw(
        self,
        name: str,
        step: int,
        style: Callable[[], HeatmapFigure],
        layers: Sequence[str],
        epochs: Sequence[int],
        matrix: np.ndarray,
        *,
        frozen: np.ndarray | None = None,
        write: Write | None = None,
    ) -> None:
        """Draw ``matrix`` on the figure of ``name`` (``style()`` makes it the first time), then ``write`` the image.

        Both run on the worker thread in the background; see :meth:`finished`. ``frozen``: cells to hatch (see
        :meth:`HeatmapFigure.render`).
        """
        arguments = (name, style, list(layers), list(epochs), np.array(matrix, dtype=float), frozen)
        if self.background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="svcca-heatmaps")
            result = self._executor.submit(self._render, *arguments, write=write)
        else:
            result = Future()
            result.set_result(self._render(*arguments, write=write))
        self._pending.append(Drawing(name, step, tuple(epochs), result))

    def finished(self, *, wait: bool = False) -> list[tuple[Drawing, Drawn]]:
        """The drawings done since the last call, with their results, in the order asked (``wait``: all of them)."""
        done = []
        while self._pending and (wait or self._pending[0].result.done()):
            drawing = self._pending.pop(0)
            done.append((drawing, drawing.result.result()))
        return done

    def close(self) -> None:
        """Stop the worker thread once its drawings are done (a later :meth:`draw` starts a new one)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _render(
        self,
        name: str,
        style: Callable[[], HeatmapFigure],
        layers: list[str],
        epochs: list[int],
        matrix: np.ndarray,
        frozen: np.ndarray | None,
        *,
        write: Write | None,
    ) -> Drawn:
        """Draw and write one picture (in the worker thread when in the background), counting its seconds."""
        started = time.perf_counter()
        if name not in self._figures:
            self._figures[name] = style()
        image = self._figures[name].render(layers, epochs, matrix, frozen)
        errors = write(image) if write is not None else []
        self.add_seconds(time.perf_counter() - started)
        return Drawn(image, errors)
