"""Turning the history into what users look at: TensorBoard scalars, heatmaps and layouts, and a CSV file.

The history is a list of rows ``{"epoch", "layer", "reference", "metric", "value"}``. A row's TensorBoard tag is
``{metric}/{reference}/{layer}`` at ``global_step = epoch``; besides the references ("previous", "initial",
"final", fixed references), the reference slot also holds ``dims`` (directions kept), ``baseline`` (the noise
floor) and ``frozen`` (1 once a layer is frozen). Scalars go to every logger through ``log_metrics``;
images, text and the custom-scalars layout only to loggers whose ``experiment`` can take them (duck typing, so
both Lightning namespaces and plain ``SummaryWriter`` users work). Nothing here needs a logger: the history and
the CSV are kept regardless.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HISTORY_COLUMNS",
    "HeatmapFigure",
    "Reporter",
    "convergence_epochs",
    "heatmap_image",
    "history_matrix",
    "read_history_csv",
    "tag",
    "write_history_csv",
]

HISTORY_COLUMNS = ("epoch", "layer", "reference", "metric", "value")
HISTORY_FILE = "svcca_history.csv"
#: Reference slots that are not references: per-layer facts logged beside the similarities.
LAYER_FACTS = ("dims", "baseline", "frozen")


def tag(metric: str, reference: str, layer: str) -> str:
    """The TensorBoard tag of a history row."""
    return f"{metric}/{reference}/{layer}"


def history_matrix(
    history: Iterable[Mapping[str, Any]], reference: str, metric: str, layers: Sequence[str] | None = None
) -> tuple[list[str], list[int], np.ndarray]:
    """Layers x epochs matrix of one reference and metric (NaN where nothing was measured).

    Args:
        history: history rows.
        reference: e.g. ``"final"``.
        metric: e.g. ``"svcca"``.
        layers: row order (bottom-up); default: order of first appearance.

    Returns:
        ``(layers, epochs, matrix)`` with ``matrix[i, j]`` the value of ``layers[i]`` at ``epochs[j]``.
    """
    cells: dict[tuple[str, int], float] = {}
    seen: list[str] = []
    for row in history:
        if row["reference"] == reference and row["metric"] == metric:
            cells[(row["layer"], int(row["epoch"]))] = float(row["value"])
            if row["layer"] not in seen:
                seen.append(row["layer"])
    layers = [layer for layer in (layers or seen) if any(key[0] == layer for key in cells)]
    epochs = sorted({epoch for _, epoch in cells})
    matrix = np.full((len(layers), len(epochs)), np.nan)
    for i, layer in enumerate(layers):
        for j, epoch in enumerate(epochs):
            matrix[i, j] = cells.get((layer, epoch), np.nan)
    return layers, epochs, matrix


def convergence_epochs(
    history: Iterable[Mapping[str, Any]],
    thresholds: Sequence[float] = (0.9, 0.95),
    *,
    reference: str = "final",
    metric: str = "svcca",
    layers: Sequence[str] | None = None,
) -> dict[str, dict[float, int | None]]:
    """First epoch from which each layer stays at or above each threshold (``None``: never).

    "Stays": the value at that epoch and every later measured epoch reaches the threshold, so a passing spike
    does not count as convergence.
    """
    names, epochs, matrix = history_matrix(history, reference, metric, layers)
    result: dict[str, dict[float, int | None]] = {}
    for i, layer in enumerate(names):
        result[layer] = {}
        for threshold in thresholds:
            first = None
            for j in range(len(epochs) - 1, -1, -1):
                if np.isnan(matrix[i, j]) or matrix[i, j] < threshold:
                    break
                first = epochs[j]
            result[layer][threshold] = first
    return result


class HeatmapFigure:
    """A layers x epochs heatmap, first layer at the bottom, redrawn as the epochs come in.

    Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed). The figure is built
    once and redrawn with new data: building the axes costs three times as much as drawing them, and the
    callback redraws every epoch.
    """

    def __init__(self, *, title: str, label: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._figure = Figure(dpi=100)
        self._canvas = FigureCanvasAgg(self._figure)
        self._axes = self._figure.add_subplot()
        self._image = self._axes.imshow(
            np.zeros((1, 1)), origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis"
        )
        self._axes.set_xlabel("epoch", fontsize=8)
        self._axes.set_title(title, fontsize=9)
        self._figure.colorbar(self._image, ax=self._axes, label=label).ax.tick_params(labelsize=7)

    def render(self, layers: Sequence[str], epochs: Sequence[int], matrix: np.ndarray) -> np.ndarray:
        """The heatmap of ``matrix[i, j]`` (layer ``i``, epoch ``j``) as an RGB image ``(H, W, 3)``."""
        height = 1.6 + 0.32 * max(len(layers), 1)
        label_width = 0.3 + 0.06 * max((len(layer) for layer in layers), default=1)  # inches, 7-point labels
        width = label_width + 2.9 + min(0.22 * max(len(epochs), 1), 9.0)
        self._figure.set_size_inches(width, height)
        self._image.set_data(np.ma.masked_invalid(matrix))
        self._image.set_extent((-0.5, len(epochs) - 0.5, -0.5, len(layers) - 0.5))
        self._axes.set_yticks(range(len(layers)), labels=list(layers), fontsize=7)
        step = max(1, math.ceil(len(epochs) / 12))
        self._axes.set_xticks(range(0, len(epochs), step), labels=[str(e) for e in epochs[::step]], fontsize=7)
        # margins from the label width (tight_layout would cost a third of the drawing time, every epoch)
        self._figure.subplots_adjust(left=label_width / width, right=0.97, bottom=0.5 / height, top=1.0 - 0.35 / height)
        self._canvas.draw()
        return np.asarray(self._canvas.buffer_rgba())[..., :3].copy()


def heatmap_image(
    layers: Sequence[str], epochs: Sequence[int], matrix: np.ndarray, *, title: str, label: str
) -> np.ndarray:
    """Render a layers x epochs matrix as an RGB image ``(H, W, 3)``, first layer at the bottom."""
    return HeatmapFigure(title=title, label=label).render(layers, epochs, matrix)


def write_history_csv(history: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write history rows to a CSV file with :data:`HISTORY_COLUMNS` (atomically: write, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    partial.replace(path)
    return path


def read_history_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a history CSV back into rows with typed ``epoch`` (int) and ``value`` (float)."""
    with Path(path).open(newline="") as handle:
        return [{**row, "epoch": int(row["epoch"]), "value": float(row["value"])} for row in csv.DictReader(handle)]


class Reporter:
    """Writes history rows to the loggers and the CSV file.

    Args:
        loggers: the trainer's loggers (any with ``log_metrics``); TensorBoard extras go to those whose
            ``experiment`` has ``add_image``, ``add_text`` or ``add_custom_scalars``.
        log_dir: where ``svcca_history.csv`` goes (``None``: no file).
    """

    def __init__(self, loggers: Sequence[Any], log_dir: str | Path | None) -> None:
        self.loggers = list(loggers)
        self.csv_path = None if log_dir is None else Path(log_dir) / HISTORY_FILE
        self._figures: dict[str, HeatmapFigure] = {}

    def scalars(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Log rows as scalars, one ``log_metrics`` call per epoch (the step)."""
        by_epoch: dict[int, dict[str, float]] = {}
        for row in rows:
            by_epoch.setdefault(int(row["epoch"]), {})[tag(row["metric"], row["reference"], row["layer"])] = float(
                row["value"]
            )
        for epoch in sorted(by_epoch):
            for logger in self.loggers:
                logger.log_metrics(by_epoch[epoch], step=epoch)

    def heatmap(
        self,
        history: Iterable[Mapping[str, Any]],
        *,
        reference: str,
        metric: str,
        layers: Sequence[str],
        step: int,
    ) -> None:
        """Draw the layers x epochs heatmap of a reference as image ``{metric}/{reference}/heatmap``."""
        writers = self._experiments("add_image")
        if not writers:
            return
        names, epochs, matrix = history_matrix(history, reference, metric, layers)
        if not names or not epochs:
            return
        name = tag(metric, reference, "heatmap")
        if name not in self._figures:
            self._figures[name] = HeatmapFigure(title=f"{metric} to {reference}", label=metric)
        image = self._figures[name].render(names, epochs, matrix)
        for writer in writers:
            writer.add_image(name, image, step, dataformats="HWC")

    def layout(self, charts: Sequence[tuple[str, str]], layers: Sequence[str]) -> None:
        """Custom-scalars layout: one chart per ``(metric, reference)`` with every layer on it, grouped by metric."""
        writers = self._experiments("add_custom_scalars")
        if not writers:
            return
        layout: dict[str, dict[str, list]] = {}
        for metric, reference in charts:
            series = [f"^{re.escape(tag(metric, reference, layer))}$" for layer in layers]
            layout.setdefault(metric, {})[f"{metric}/{reference}"] = ["Multiline", series]
        for writer in writers:
            writer.add_custom_scalars(layout)

    def text(self, name: str, message: str, step: int) -> None:
        """A text entry (e.g. a freeze event)."""
        for writer in self._experiments("add_text"):
            writer.add_text(name, message, step)

    def write_csv(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Rewrite ``svcca_history.csv`` with the whole history."""
        if self.csv_path is not None:
            write_history_csv(history, self.csv_path)

    def flush(self) -> None:
        """Flush writers that buffer (TensorBoard), so the event files are complete on disk."""
        for writer in self._experiments("flush"):
            writer.flush()

    def _experiments(self, method: str) -> list[Any]:
        writers = []
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if callable(getattr(experiment, method, None)):
                writers.append(experiment)
        return writers
