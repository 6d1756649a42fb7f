"""Where the monitor's outputs go: the writer interface, a ``SummaryWriter`` adapter, and the fan-out.

A writer is anything with ``log_metrics(metrics: dict[str, float], step: int)``: every Lightning logger is one
as it is (TensorBoard, CSV, MLflow, W&B, in either Lightning namespace). Images (heatmaps), text (freeze events)
and the custom-scalars layout go to writers whose ``experiment`` has ``add_image``, ``add_text`` or
``add_custom_scalars``, which a TensorBoard logger's ``experiment`` (a ``SummaryWriter``) does. A plain
``torch.utils.tensorboard.SummaryWriter`` is wrapped in :class:`TensorBoardWriter`. :class:`Reporter` sends each
measurement's rows to every writer at its global step and rewrites the history CSV.

Steps only go forward: each measurement is one ``log_metrics`` call at its step. The end-of-fit ``final`` curve
belongs to earlier steps, so only TensorBoard (which takes steps in any order) receives it as scalars; the other
writers get it as the final heatmap image (W&B ``log_image``, MLflow ``log_image``), a table (W&B
``log_table``) or the history CSV as an artifact (MLflow), and the CSV file beside a CSVLogger's own holds it.

Writers are optional outputs: one that raises (TensorBoard's event writer on a full disk, a logger whose server is
gone) is warned about once (:class:`WriterWarning`) and skipped from then on; the history, its CSV and the other
writers go on.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lightning_svcca.core.safe_files import try_write
from lightning_svcca.measures import SimilarityWarning
from lightning_svcca.output.drawing import Drawer, Write
from lightning_svcca.output.reporting import (
    FREEZE_REFERENCE,
    HISTORY_COLUMNS,
    HeatmapFigure,
    frozen_mask,
    heatmap_style,
    history_matrix,
    tag,
    write_history_csv,
)

__all__ = ["Reporter", "TensorBoardWriter", "Writer", "WriterWarning", "as_writers"]


class WriterWarning(SimilarityWarning):
    """A writer (logger) raised; it is skipped for the rest of the run, and training goes on."""


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
        """Flush and close the underlying ``SummaryWriter`` (one that fails, on a full disk say, only warns)."""
        try:
            self.experiment.close()
        except Exception as error:  # noqa: BLE001 - the run is over; its history is kept elsewhere
            warnings.warn(
                f"closing the TensorBoard writer failed ({type(error).__name__}: {str(error)[:200]}); its event file"
                " may be incomplete. The history is in svcca_history.csv and the checkpoint",
                WriterWarning,
                stacklevel=2,
            )


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


class Reporter:
    """Sends history rows to the writers and keeps the history CSV up to date.

    Args:
        writers: normalised writers (:func:`as_writers`).
        csv_path: the history CSV (``None``: no file).
        axis: the heatmaps' columns: ``"epoch"``, or ``"step"`` for runs measured every k steps.
        heatmap_time_share: the largest share of the time since this reporter was made that drawing heatmaps
            may take. Drawing one costs about 0.1 s (matplotlib), as much as an epoch of a small model: past the
            share, a heatmap waits for a later measurement, and :meth:`flush` draws what is still waiting.
        background: draw heatmaps, and send them to the writers that take images, on a background thread
            (:class:`~lightning_svcca.output.drawing.Drawer`); a writer that raised there is dropped at the
            reporter's next call, and :meth:`flush` waits for them all. ``False``: drawn and written when asked.
    """

    def __init__(
        self,
        writers: Sequence[Any],
        csv_path: Path | None,
        *,
        axis: str = "epoch",
        heatmap_time_share: float = 1.0,
        background: bool = False,
    ) -> None:
        self.writers = list(writers)
        self.csv_path = csv_path
        self._csv_failed: set[Path] = set()  # the CSV while its writes fail (warned once)
        self.axis = axis
        self.heatmap_time_share = heatmap_time_share
        self._drawer = Drawer(background=background)
        self._last_step = -1
        self._drawn: dict[str, tuple[int, tuple[int, ...], Any]] = {}
        self._started = time.perf_counter()
        #: Heatmaps put off by the time share: name -> the latest call's arguments.
        self._waiting: dict[str, tuple[Iterable[Mapping[str, Any]], dict[str, Any]]] = {}

    def scalars(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """One ``log_metrics`` call per step (in increasing order) with every row's value at that step.

        Heatmaps drawn in the background since the last call go to the writers first.
        """
        self._take_drawn()
        by_step: dict[int, dict[str, float]] = {}
        for row in rows:
            by_step.setdefault(int(row["step"]), {})[tag(row["metric"], row["reference"], row["layer"])] = float(
                row["value"]
            )
        for step in sorted(by_step):
            if step < self._last_step:
                continue  # a logger never receives a step lower than one it has (W&B would drop it)
            for writer in list(self.writers):
                self._guarded(writer, writer.log_metrics, by_step[step], step=step)
            self._last_step = step

    def late_scalars(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Rows of earlier steps (the ``final`` curve): TensorBoard scalars at their own steps."""
        for writer, experiment in self._experiments("add_scalar"):
            for row in rows:
                name = tag(row["metric"], row["reference"], row["layer"])
                if not self._guarded(writer, experiment.add_scalar, name, row["value"], row["step"]):
                    break

    def heatmap(
        self,
        history: Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]],
        *,
        reference: str,
        metric: str,
        layers: Sequence[str],
        step: int,
        always: bool = False,
    ) -> Any:
        """Draw the layers x epochs heatmap of a reference as image ``{metric}/{reference}/heatmap``.

        ``history``: the rows, or a function returning them (called only when the picture is drawn; its seconds
        count as drawing time). Drawn only when a writer takes images, or ``always`` (the end-of-fit picture other
        writers get). Unless ``always``, a heatmap that would take drawing past ``heatmap_time_share``, or whose
        previous picture is still being drawn (below a share of 1.0), waits (:meth:`flush` draws it). In the
        background, the image goes to the writers when drawn and ``None`` is returned; otherwise (and with
        ``always``) the image is returned (``None`` when there is nothing to draw, or when it waits). The same
        picture is not written twice at one step: it is returned as drawn before (with ``always``, once the
        pictures still drawing are done: the live ``final`` picture of the last measurement is the end-of-fit one).
        """
        self._take_drawn(wait=always)
        experiments = self._experiments("add_image")
        if not experiments and not always:
            return None
        name = tag(metric, reference, "heatmap")
        self._waiting.pop(name, None)
        if not always and self._must_wait(name):
            self._waiting[name] = (history, {"reference": reference, "metric": metric, "layers": layers, "step": step})
            return None
        started = time.perf_counter()
        rows = list(history() if callable(history) else history)
        names, epochs, matrix = history_matrix(rows, reference, metric, layers, axis=self.axis)
        frozen = None if reference == FREEZE_REFERENCE else frozen_mask(rows, names, epochs, axis=self.axis)
        self._drawer.add_seconds(time.perf_counter() - started)
        if not names or not epochs:
            return None
        drawn = self._drawn.get(name)
        if drawn is not None and drawn[:2] == (step, tuple(epochs)):
            return drawn[2]

        def style() -> HeatmapFigure:
            return HeatmapFigure(**heatmap_style(metric, reference), xlabel=self.axis)

        write = self._image_write(name, step, experiments)
        self._drawer.draw(name, step, style, names, epochs, matrix, frozen=frozen, write=write)
        if self._drawer.background and not always:
            return None
        self._take_drawn(wait=True)
        return self._drawn[name][2]

    def final_summary(self, image: Any, rows: Sequence[Mapping[str, Any]], step: int, name: str) -> None:
        """The ``final`` curve for writers that cannot take earlier steps: an image, a table, the CSV artifact."""
        for writer in list(self.writers):
            self._guarded(writer, self._final_summary, writer, image, rows, step, name)

    def _final_summary(self, writer: Any, image: Any, rows: Sequence[Mapping[str, Any]], step: int, name: str) -> None:
        """:meth:`final_summary` for one writer."""
        experiment = getattr(writer, "experiment", None)
        if callable(getattr(experiment, "add_scalar", None)):
            return  # TensorBoard has the curve as scalars
        if image is not None and callable(getattr(writer, "log_image", None)):  # W&B
            writer.log_image(key=name, images=[image], step=step)
        if rows and callable(getattr(writer, "log_table", None)):  # W&B
            columns = list(HISTORY_COLUMNS)
            writer.log_table(key=f"{name}_table", columns=columns, data=[[r[c] for c in columns] for r in rows])
        run_id = getattr(writer, "run_id", None)
        if run_id is not None and callable(getattr(experiment, "log_artifact", None)):  # MLflow
            if image is not None and callable(getattr(experiment, "log_image", None)):
                experiment.log_image(run_id, image, artifact_file=f"{re.sub('/', '_', name)}.png")
            if self.csv_path is not None and self.csv_path.is_file():
                experiment.log_artifact(run_id, str(self.csv_path))

    def image(self, name: str, image: Any, step: int) -> None:
        """An RGB image ``(H, W, 3)`` to writers that take images (TensorBoard; W&B ``log_image``)."""
        for writer, experiment in self._experiments("add_image"):
            self._guarded(writer, experiment.add_image, name, image, step, dataformats="HWC")
        for writer in list(self.writers):
            if callable(getattr(writer, "log_image", None)):
                self._guarded(writer, writer.log_image, key=name, images=[image], step=max(step, self._last_step))

    def layout(self, charts: Sequence[tuple[str, str]], layers: Sequence[str]) -> None:
        """Custom-scalars layout: one chart per ``(metric, reference)`` with every layer on it, grouped by metric."""
        experiments = self._experiments("add_custom_scalars")
        if not experiments:
            return
        layout: dict[str, dict[str, list]] = {}
        for metric, reference in charts:
            series = [f"^{re.escape(tag(metric, reference, layer))}$" for layer in layers]
            layout.setdefault(metric, {})[f"{metric}/{reference}"] = ["Multiline", series]
        for writer, experiment in experiments:
            self._guarded(writer, experiment.add_custom_scalars, layout)

    def text(self, name: str, message: str, step: int) -> None:
        """A text entry (e.g. a freeze event)."""
        for writer, experiment in self._experiments("add_text"):
            self._guarded(writer, experiment.add_text, name, message, step)

    def write_csv(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Rewrite the history CSV with the whole history (atomically; a full or read-only disk only warns)."""
        if self.csv_path is not None:  # a failed write is warned once and tried again at the next call
            try_write(write_history_csv, history, self.csv_path, where=self.csv_path, warned=self._csv_failed)

    def flush(self) -> None:
        """Draw the heatmaps still waiting; flush writers that buffer (TensorBoard), so event files are complete."""
        waiting, self._waiting = self._waiting, {}
        for history, arguments in waiting.values():
            self.heatmap(history, **arguments, always=True)
        self._take_drawn(wait=True)
        self._drawer.close()
        for writer, experiment in self._experiments("flush"):
            self._guarded(writer, experiment.flush)

    def _must_wait(self, name: str) -> bool:
        """Whether a heatmap waits: drawing is over its share of the time, or its last picture is still drawing.

        A share of 1.0 draws every one.
        """
        if self.heatmap_time_share >= 1.0:
            return False
        elapsed = time.perf_counter() - self._started
        return self._drawer.seconds > self.heatmap_time_share * elapsed or self._drawer.busy(name)

    def _take_drawn(self, *, wait: bool = False) -> None:
        """Take the heatmaps drawn and written since the last call (``wait``: all asked for); drop failed writers."""
        for drawing, drawn in self._drawer.finished(wait=wait):
            self._drawn[drawing.name] = (drawing.step, drawing.epochs, drawn.image)
            for writer, error in drawn.errors:
                self._drop(writer, error)

    def _image_write(self, name: str, step: int, experiments: list[tuple[Any, Any]]) -> Write:
        """What sends the picture ``name`` at ``step`` to ``experiments`` (on the drawing thread), errors returned.

        A writer dropped meanwhile (on the training thread) gets nothing; the errors are dropped there too
        (:meth:`_take_drawn`), so warnings and the writer list stay the training thread's.
        """

        def write(image: Any) -> list[tuple[Any, Exception]]:
            errors: list[tuple[Any, Exception]] = []
            for writer, experiment in experiments:
                if writer in self.writers:
                    try:
                        experiment.add_image(name, image, step, dataformats="HWC")
                    except Exception as error:  # noqa: BLE001 - any writer's error: the training thread drops it
                        errors.append((writer, error))
            return errors

        return write

    def _experiments(self, method: str) -> list[tuple[Any, Any]]:
        """``(writer, writer.experiment)`` for each writer whose experiment has ``method``."""
        found = []
        for writer in self.writers:
            experiment = getattr(writer, "experiment", None)
            if callable(getattr(experiment, method, None)):
                found.append((writer, experiment))
        return found

    def _guarded(self, writer: Any, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """``call(*args, **kwargs)`` for ``writer``; when it raises, warn once and drop the writer (``False``).

        Why: a writer is an optional output; a full disk under TensorBoard's event writer, or a logging server gone,
        must not end a fit the history (kept in memory, the CSV and the checkpoint) does not need it for.
        """
        if writer not in self.writers:
            return False
        try:
            call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever a third-party writer raises, training goes on
            self._drop(writer, error)
            return False
        return True

    def _drop(self, writer: Any, error: Exception) -> None:
        """Warn that ``writer`` raised ``error`` and give it nothing more (once: a writer dropped already is left)."""
        if writer not in self.writers:
            return
        self.writers.remove(writer)
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        warnings.warn(
            f"the writer {type(writer).__name__} failed ({type(error).__name__}: {detail}); it gets nothing more"
            " from this run, and training goes on. The history is kept in memory, in the checkpoint and in"
            " svcca_history.csv; fix the writer (free disk space, its server) for the next run",
            WriterWarning,
            stacklevel=4,
        )
