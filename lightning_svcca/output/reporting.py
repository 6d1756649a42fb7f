"""Turning the history into what people read: tags, layers x epochs matrices, heatmap images and the CSV file.

The history is a list of rows ``{"epoch", "step", "layer", "reference", "metric", "value"}``. A row's tag is
``{metric}/{reference}/{layer}``; besides the references ("previous", "initial", "final", fixed references), the
reference slot also holds ``dims`` (directions kept) and ``baseline`` (the noise floor) of each metric. Freeze state
has a metric of its own: rows ``metric="freeze", reference="frozen"`` (1 once a layer is frozen, tag
``freeze/frozen/{layer}``); histories written before held them as ``metric="svcca"``, which
:func:`upgrade_freeze_rows` translates when they are read. Where rows go (writers, loggers) is
:mod:`lightning_svcca.output.writers`' job; nothing here needs a logger, and matplotlib is imported only when a
heatmap is drawn.
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lightning_svcca.core.rows import FREEZE_METRIC, FREEZE_REFERENCE, HISTORY_COLUMNS
from lightning_svcca.core.timeline import evenly_spaced
from lightning_svcca.output.csv_cells import neutralise_cell, restore_cell

__all__ = [
    "FREEZE_METRIC",
    "FREEZE_REFERENCE",
    "HISTORY_COLUMNS",
    "HeatmapFigure",
    "convergence_epochs",
    "evenly_spaced",
    "frozen_mask",
    "heatmap_image",
    "heatmap_style",
    "history_axis",
    "history_matrix",
    "read_history_csv",
    "similarity_position",
    "tag",
    "upgrade_freeze_rows",
    "write_history_csv",
]

HISTORY_FILE = "svcca_history.csv"

T = TypeVar("T")


def tag(metric: str, reference: str, layer: str) -> str:
    """The TensorBoard tag of a history row."""
    return f"{metric}/{reference}/{layer}"


def upgrade_freeze_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with freeze state under its own metric, changed in place.

    Older histories held freeze rows as ``metric="svcca", reference="frozen"``; they get ``metric="freeze"``.
    """
    for row in rows:
        if row["reference"] == FREEZE_REFERENCE and row["metric"] != FREEZE_METRIC:
            row["metric"] = FREEZE_METRIC
    return rows


def history_axis(history: Iterable[Mapping[str, Any]]) -> str:
    """The column key that tells a history's measurements apart: ``"epoch"``, or ``"step"`` if epochs collide.

    Two measurements share an epoch in a run measured every k steps; keyed by epoch, one would hide the other.

    Example:
        >>> history_axis([{"epoch": 0, "step": 0}, {"epoch": 0, "step": 10}, {"epoch": 1, "step": 20}])
        'step'
    """
    steps: dict[int, int] = {}
    for row in history:
        step = row.get("step")
        if step is None:
            continue
        if steps.setdefault(int(row["epoch"]), int(step)) != int(step):
            return "step"
    return "epoch"


def history_matrix(
    history: Iterable[Mapping[str, Any]],
    reference: str,
    metric: str,
    layers: Sequence[str] | None = None,
    *,
    axis: str = "epoch",
) -> tuple[list[str], list[int], np.ndarray]:
    """Layers x epochs matrix of one reference and metric (NaN where nothing was measured).

    Args:
        history: history rows.
        reference: e.g. ``"final"``.
        metric: e.g. ``"svcca"``.
        layers: row order (bottom-up); default: order of first appearance.
        axis: the column key, ``"epoch"`` or ``"step"`` (for runs measured every k steps).

    Returns:
        ``(layers, epochs, matrix)`` with ``matrix[i, j]`` the value of ``layers[i]`` at ``epochs[j]``.
    """
    cells: dict[tuple[str, int], float] = {}
    seen: list[str] = []
    for row in history:
        if row["reference"] == reference and row["metric"] == metric:
            cells[(row["layer"], int(row[axis]))] = float(row["value"])
            if row["layer"] not in seen:
                seen.append(row["layer"])
    layers = [layer for layer in (layers or seen) if any(key[0] == layer for key in cells)]
    epochs = sorted({epoch for _, epoch in cells})
    matrix = np.full((len(layers), len(epochs)), np.nan)
    for i, layer in enumerate(layers):
        for j, epoch in enumerate(epochs):
            matrix[i, j] = cells.get((layer, epoch), np.nan)
    return layers, epochs, matrix


def frozen_mask(
    history: Iterable[Mapping[str, Any]], layers: Sequence[str], columns: Sequence[int], *, axis: str = "epoch"
) -> np.ndarray:
    """Whether ``layers[i]`` was frozen at ``columns[j]``, from the history's ``frozen`` rows (False without one).

    Heatmaps and tables mark these cells: a frozen layer's similarity to its previous snapshot is 1 by
    construction, which would otherwise read as a converged layer.
    """
    names, points, values = history_matrix(history, FREEZE_REFERENCE, FREEZE_METRIC, layers, axis=axis)
    mask = np.zeros((len(layers), len(columns)), dtype=bool)
    row_of, column_of = {name: i for i, name in enumerate(names)}, {point: j for j, point in enumerate(points)}
    for i, layer in enumerate(layers):
        for j, column in enumerate(columns):
            if layer in row_of and column in column_of:
                mask[i, j] = values[row_of[layer], column_of[column]] == 1.0
    return mask


def convergence_epochs(
    history: Iterable[Mapping[str, Any]],
    thresholds: Sequence[float] = (0.9, 0.95),
    *,
    reference: str = "final",
    metric: str = "svcca",
    layers: Sequence[str] | None = None,
    axis: str = "epoch",
) -> dict[str, dict[float, int | None]]:
    """First epoch (or step, with ``axis="step"``) from which each layer stays at or above each threshold.

    ``None``: never.

    "Stays": the value at that epoch and every later measured epoch reaches the threshold, so a passing spike
    does not count as convergence.
    """
    names, epochs, matrix = history_matrix(history, reference, metric, layers, axis=axis)
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


#: Colour-bar ticks of the similarity scale: the thresholds people judge convergence by.
SIMILARITY_TICKS = (0.0, 0.5, 0.9, 0.95, 0.99, 0.999)
#: The similarity scale resolves ``1 - value`` down to this; closer to 1 shows as the top colour.
SIMILARITY_FLOOR = 1e-3
#: At most this many epoch columns are drawn; longer runs show evenly spaced epochs (first and last included).
MAX_COLUMNS = 100
#: Cells are annotated with their value while there are at most this many (and they are wide enough).
MAX_ANNOTATED_CELLS = 160

_FONT = 8  # points, every label
_DPI = 100
_MIN_ANNOTATION_FONT = 5.5  # points: smaller cells are left without their values
_PLOT_WIDTH = 5.6  # inches of heatmap, the same for every run: the image size never depends on the epochs
_ROW_HEIGHT = (0.15, 0.24)  # inches per layer: the most, down to the least once the map is 6 inches high
_MIN_PLOT_HEIGHT = 1.5


def similarity_position(values: np.ndarray | float) -> np.ndarray:
    """Where a similarity sits on the colour scale: ``log10(1 - value) / log10(SIMILARITY_FLOOR)``, in [0, 1].

    0 is a value of 0 (or below), 0.1 is 0.5, 1/3 is 0.9, 0.43 is 0.95, 2/3 is 0.99, 1 is 0.999 and above; NaN
    stays NaN. Equal steps of the scale are equal factors of the remaining dissimilarity, so the band between
    0.9 and 1 that convergence thresholds live in gets two thirds of the colours.
    """
    gap = np.clip(1.0 - np.asarray(values, dtype=float), SIMILARITY_FLOOR, 1.0)
    return np.log10(gap) / math.log10(SIMILARITY_FLOOR)


def heatmap_style(metric: str, reference: str) -> dict[str, str]:
    """``title``, ``label`` and ``scale`` for :class:`HeatmapFigure` of one metric and reference slot.

    Similarities to references use the similarity scale; the per-layer facts (``dims``: directions kept,
    ``baseline``: the shuffled-pairing noise floor, ``frozen``: 0 or 1) a linear scale over their own range.
    """
    if reference == "dims":
        return {"title": f"directions kept by {metric}", "label": "directions kept", "scale": "linear"}
    if reference == "baseline":
        return {"title": f"{metric} noise floor (shuffled pairing)", "label": metric, "scale": "linear"}
    if reference == "frozen":
        return {"title": "frozen layers", "label": "frozen (1) or trained (0)", "scale": "linear"}
    return {"title": f"{metric} to {reference}", "label": metric, "scale": "similarity"}


class HeatmapFigure:
    """A layers x epochs heatmap, first layer at the bottom, redrawn as the epochs come in.

    Similarities are coloured on ``1 - value`` with a log scale (:func:`similarity_position`), so 0.9, 0.95,
    0.99 and 1 get clearly different colours; the colour bar is ticked at :data:`SIMILARITY_TICKS`. With
    ``scale="linear"`` (kept directions, noise floor, freezes) the colours span the values' own range. The image
    has the same size at every epoch: the heatmap area is fixed and runs longer than :data:`MAX_COLUMNS` epochs
    show evenly spaced epochs; the height follows the number of layers and the width the longest layer name,
    measured with the font so that no label is clipped. Small maps are annotated with their values.

    Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed). The figure is built
    once and redrawn with new data: building the axes costs three times as much as drawing them, and the
    callback redraws every epoch. Its size only grows (when more layers or longer names come in), never shrinks.

    Args:
        title: drawn above the map, e.g. ``"svcca to final"``.
        label: the colour bar's label, e.g. the metric.
        scale: ``"similarity"`` (values in [0, 1], log scale of ``1 - value``) or ``"linear"``.
        xlabel: what the columns are, ``"epoch"`` or ``"step"``.
    """

    def __init__(self, *, title: str, label: str, scale: str = "similarity", xlabel: str = "epoch") -> None:
        if scale not in ("similarity", "linear"):
            raise ValueError(f"scale must be 'similarity' or 'linear', got {scale!r}")
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.scale = scale
        self.xlabel = xlabel
        self.figure = Figure(dpi=_DPI)
        self._canvas = FigureCanvasAgg(self.figure)
        self._axes = self.figure.add_axes((0.1, 0.1, 0.7, 0.8))
        self._bar_axes = self.figure.add_axes((0.85, 0.1, 0.03, 0.8))
        # grey: not measured; a different map for the linear scale, so it is not read as a similarity
        cmap = colormaps["viridis" if scale == "similarity" else "cividis"].with_extremes(bad="#d9d9d9")
        self._image = self._axes.imshow(
            np.zeros((1, 1)), origin="lower", aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap=cmap
        )
        self._axes.set_title(title, fontsize=_FONT + 2)
        self._axes.set_ylabel("layer (bottom-up)", fontsize=_FONT + 1)
        self._axes.tick_params(labelsize=_FONT, length=2)
        self._bar = self.figure.colorbar(self._image, cax=self._bar_axes)
        self._bar.ax.tick_params(labelsize=_FONT, length=2)
        if scale == "similarity":
            self._bar.set_ticks(similarity_position(SIMILARITY_TICKS), labels=_tick_labels(SIMILARITY_TICKS))
            self._bar.set_label(f"{label} (log scale of 1 - {label})", fontsize=_FONT + 1)
        else:
            self._bar.set_label(label, fontsize=_FONT + 1)
        self._annotations: list[Any] = []
        self._hatches: list[Any] = []
        self._widths: dict[tuple[str, float], float] = {}
        self._size = (0.0, 0.0)

    def render(
        self, layers: Sequence[str], epochs: Sequence[int], matrix: np.ndarray, frozen: np.ndarray | None = None
    ) -> np.ndarray:
        """The heatmap of ``matrix[i, j]`` (layer ``i``, epoch ``j``) as an RGB image ``(H, W, 3)``, ``uint8``.

        ``frozen``: a boolean matrix of the same shape; its cells are hatched (a frozen layer reads 1 to its
        previous snapshot by construction, not by convergence).
        """
        matrix = np.asarray(matrix, dtype=float)
        if matrix.shape != (len(layers), len(epochs)):
            raise ValueError(
                f"matrix must have one row per layer and one column per epoch, {(len(layers), len(epochs))}, got"
                f" shape {matrix.shape}"
            )
        columns = evenly_spaced(range(len(epochs)), MAX_COLUMNS)
        shown = matrix[:, columns]
        shown_epochs = [epochs[j] for j in columns]
        if self.scale == "similarity":
            self._image.set_data(np.ma.masked_invalid(similarity_position(shown)))
        else:
            self._image.set_data(np.ma.masked_invalid(shown))
            self._image.set_clim(*_linear_limits(shown))
            finite = shown[np.isfinite(shown)]
            from matplotlib.ticker import MaxNLocator

            self._bar.locator = MaxNLocator(nbins=6, integer=bool(np.all(finite == np.round(finite))))
        self._image.set_extent((-0.5, max(len(columns), 1) - 0.5, -0.5, max(len(layers), 1) - 0.5))
        self._axes.set_yticks(range(len(layers)), labels=list(layers))
        self._axes.set_xticks(*_epoch_ticks(shown_epochs))
        notes = [f"{len(columns)} of {len(epochs)} measured shown"] if len(columns) < len(epochs) else []
        notes += ["grey: not measured"] if np.isnan(shown).any() else []
        hatched = np.zeros(shown.shape, dtype=bool) if frozen is None else np.asarray(frozen, dtype=bool)[:, columns]
        notes += ["hatched: frozen"] if hatched.any() else []
        self._axes.set_xlabel(self.xlabel + (f" ({'; '.join(notes)})" if notes else ""), fontsize=_FONT + 1)
        self._layout(layers)
        self._annotate(shown)
        self._hatch(hatched)
        self._canvas.draw()
        return np.asarray(self._canvas.buffer_rgba())[..., :3].copy()

    def _layout(self, layers: Sequence[str]) -> None:
        """Size the figure and place the axes from the measured widths of the labels (in inches)."""

        def width(text: str, size: float) -> float:  # inches
            return self._text_width(text, size) / 72

        line = (_FONT + 1) * 1.4 / 72  # inches of one line of axis-label text
        row = min(_ROW_HEIGHT[1], max(_ROW_HEIGHT[0], 6.0 / max(len(layers), 1)))
        font = min(_FONT, 0.7 * row * 72)  # many layers: smaller names, so that neighbours do not overlap
        self._axes.tick_params(axis="y", labelsize=font)
        names = max((width(name, font) for name in layers), default=0.0)
        if self.scale == "similarity":
            ticks = max(width(text, _FONT) for text in _tick_labels(SIMILARITY_TICKS))
        else:  # the locator picks the ticks at drawing time: allow for the longest end of the range and a decimal
            ticks = max(width(f"{limit:g}.0", _FONT) for limit in self._image.get_clim())
        left = 0.1 + line + names + 0.1  # margin, y-axis label, layer names, tick marks
        right = 0.15 + 0.16 + 0.06 + ticks + 0.08 + line + 0.1  # gap, bar, ticks, tick labels, bar label, margin
        bottom = 0.12 + 2 * line + 0.08
        top = 0.15 + line + 0.1
        height = bottom + max(_MIN_PLOT_HEIGHT, row * len(layers)) + top
        self._size = (max(self._size[0], left + _PLOT_WIDTH + right), max(self._size[1], height))
        total_width, total_height = self._size
        self.figure.set_size_inches(total_width, total_height)
        plot = (left, bottom, total_width - left - right, total_height - bottom - top)
        self._axes.set_position(_fraction(plot, self._size))
        self._bar_axes.set_position(_fraction((plot[0] + plot[2] + 0.15, bottom, 0.16, plot[3]), self._size))

    def _annotate(self, shown: np.ndarray) -> None:
        """Write each cell's value in it while the cells are few and large enough to hold the text legibly."""
        for text in self._annotations:
            text.remove()
        self._annotations = []
        rows, columns = shown.shape
        if not rows or not columns or rows * columns > MAX_ANNOTATED_CELLS:
            return
        formatted = [[_cell_text(value, self.scale) for value in row] for row in shown]
        box = self._axes.get_position()
        cell_width = box.width * self._size[0] * 72 / columns  # points
        cell_height = box.height * self._size[1] * 72 / rows
        texts = {text for row in formatted for text in row if text}
        widest = max((self._text_width(text, 10.0) for text in texts), default=0.0) / 10.0  # points per point
        size = min(_FONT - 1, 0.85 * cell_width / max(widest, 1e-9), 0.6 * cell_height)
        if size < _MIN_ANNOTATION_FONT:
            return
        colours = self._image.to_rgba(self._image.get_array())
        for i in range(rows):
            for j in range(columns):
                if math.isnan(shown[i, j]):
                    continue
                red, green, blue, _ = colours[i, j]
                colour = "white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black"
                text = self._axes.text(j, i, formatted[i][j], ha="center", va="center", fontsize=size, color=colour)
                self._annotations.append(text)

    def _hatch(self, frozen: np.ndarray) -> None:
        """Hatch the frozen cells, each layer's run of them as one rectangle."""
        from matplotlib.patches import Rectangle

        for patch in self._hatches:
            patch.remove()
        self._hatches = []
        for i, row in enumerate(frozen):
            columns = np.flatnonzero(row)
            if columns.size:
                first, last = int(columns[0]), int(columns[-1])
                box = Rectangle((first - 0.5, i - 0.5), last - first + 1, 1.0, fill=False, hatch="///", linewidth=0)
                box.set_edgecolor("white")
                self._hatches.append(self._axes.add_patch(box))

    def _text_width(self, text: str, size: float) -> float:
        """Width of ``text`` at ``size`` points, in points (remembered: the same labels come back every epoch)."""
        if (text, size) not in self._widths:
            from matplotlib.font_manager import FontProperties

            renderer = self._canvas.get_renderer()
            pixels = renderer.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0]
            self._widths[text, size] = pixels * 72 / _DPI
        return self._widths[text, size]


def _cell_text(value: float, scale: str) -> str:
    """A cell's annotation: three significant digits, or for similarities three decimals without the zero.

    Similarities are cut rather than rounded (0.8996 is ".899": not yet 0.9), and 1 up to rounding is "1".
    """
    if math.isnan(value):
        return ""
    if scale != "similarity":
        return f"{value:.3g}"
    if value >= 1.0 - 1e-6:  # a model against itself, up to rounding
        return "1"
    if value < 0.0:
        return f"{value:.2f}"
    return f"{math.floor(value * 1000) / 1000:.3f}"[1:]


def _epoch_ticks(epochs: Sequence[int], count: int = 10) -> tuple[list[float], list[str]]:
    """Ticks at round epochs (multiples of 1, 2, 5, 10, 20, 25, 50, ...), placed between the drawn columns."""
    if not epochs:
        return [], []
    first, last = epochs[0], epochs[-1]
    steps = sorted({int(m * 10**power) for power in range(12) for m in (1, 2, 2.5, 5)})
    step = next(step for step in steps if (last - first) / step < count)
    marks = range(math.ceil(first / step) * step, last + 1, step)
    positions = np.interp(list(marks), epochs, np.arange(len(epochs)))
    return positions.tolist(), [str(mark) for mark in marks]


def _tick_labels(values: Sequence[float]) -> list[str]:
    labels = [f"{value:g}" for value in values]
    labels[-1] = f">={labels[-1]}"
    return labels


def _linear_limits(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        return low - 0.5, high + 0.5
    return low, high


def _fraction(box: tuple[float, float, float, float], size: tuple[float, float]) -> tuple[float, float, float, float]:
    left, bottom, width, height = box
    return left / size[0], bottom / size[1], width / size[0], height / size[1]


def heatmap_image(
    layers: Sequence[str],
    epochs: Sequence[int],
    matrix: np.ndarray,
    *,
    title: str,
    label: str,
    scale: str = "similarity",
    xlabel: str = "epoch",
    frozen: np.ndarray | None = None,
) -> np.ndarray:
    """Render a layers x epochs matrix as an RGB image ``(H, W, 3)``, first layer at the bottom.

    One-off drawing with :class:`HeatmapFigure` (same arguments; ``frozen`` cells hatched); to redraw as values
    come in, keep a :class:`HeatmapFigure`.
    """
    figure = HeatmapFigure(title=title, label=label, scale=scale, xlabel=xlabel)
    return figure.render(layers, epochs, matrix, frozen)


def layer_map_image(rows: Sequence[str], columns: Sequence[str], matrix: np.ndarray, *, title: str) -> np.ndarray:
    """A layers x layers similarity map as an RGB image ``(H, W, 3)``: rows bottom-up, the similarity colour scale.

    Used for cross-layer maps (each layer at one moment against each layer of a reference), coloured on
    ``1 - value`` with a log scale like the heatmaps (:func:`similarity_position`), with values in the cells.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = 1.2 + 0.32 * max(len(rows), len(columns), 3)
    longest = max((len(name) for name in (*rows, *columns)), default=4)
    margin = 0.25 + 0.065 * longest
    figure = Figure(figsize=(size + margin + 1.2, size + margin + 0.5), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_axes(_fraction((margin, margin, size, size), (size + margin + 1.2, size + margin + 0.5)))
    shown = similarity_position(np.asarray(matrix, dtype=float))
    image = axes.imshow(shown, origin="lower", cmap=colormaps["viridis"], vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(columns)), list(columns), rotation=90, fontsize=_FONT)
    axes.set_yticks(range(len(rows)), list(rows), fontsize=_FONT)
    axes.set_xlabel("reference layer", fontsize=_FONT)
    axes.set_ylabel("layer (bottom-up)", fontsize=_FONT)
    axes.set_title(title, fontsize=_FONT + 1)
    if len(rows) * len(columns) <= MAX_ANNOTATED_CELLS:
        for i in range(len(rows)):
            for j in range(len(columns)):
                value = float(matrix[i][j])
                if math.isfinite(value):
                    colour = "black" if shown[i, j] > 0.6 else "white"
                    axes.text(j, i, _cell_text(value, "similarity"), ha="center", va="center", fontsize=6, color=colour)
    bar = figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02)
    bar.set_ticks([similarity_position(t).item() for t in SIMILARITY_TICKS], labels=_tick_labels(SIMILARITY_TICKS))
    bar.ax.tick_params(labelsize=_FONT)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def write_history_csv(
    history: Iterable[Mapping[str, Any]], path: str | Path, *, columns: Sequence[str] = HISTORY_COLUMNS
) -> Path:
    """Write history rows to a CSV file with ``columns`` (default :data:`HISTORY_COLUMNS`), atomically.

    Text cells that a spreadsheet would take for a formula get a leading ``'`` (see
    :mod:`~lightning_svcca.output.csv_cells`); :func:`read_history_csv` removes it.

    The rows go to a temporary file beside ``path`` whose name holds the process id and a random UUID, which then
    replaces ``path`` in one rename: readers see the old file or the new one, never a half-written one, and two
    runs (processes or threads) writing into the same directory never collide on the temporary name.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    try:
        with partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows({key: neutralise_cell(value) for key, value in row.items()} for row in history)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # only left if writing failed
    return path


#: Columns read back as integers when a history file has them.
_INTEGER_COLUMNS = ("epoch", "step")


def read_history_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a history CSV back into rows: ``epoch`` (and ``step``, where present) as int, ``value`` as float.

    Freeze rows of older files (``metric="svcca", reference="frozen"``) come back under ``metric="freeze"``. The
    package writes every row with its line end and the file in one rename: a file ending mid-row was cut (a copy
    or a disk that failed), and its last row is left out with a :class:`FileTrustWarning` rather than read as a
    number it never held.
    """
    with Path(path).open(newline="") as handle:
        text = handle.read()
    rows = [
        {key: restore_cell(cell) if isinstance(cell, str) else cell for key, cell in row.items()}
        for row in csv.DictReader(io.StringIO(text))
    ]
    if text and not text.endswith(("\n", "\r")) and rows:
        from lightning_svcca.core.safe_files import FileTrustWarning  # it imports torch: not for every CLI read

        warnings.warn(
            f"{path} ends in the middle of a row (the file was cut): its last row is left out; the checkpoint holds"
            " the whole history",
            FileTrustWarning,
            stacklevel=2,
        )
        rows.pop()
    for row in rows:
        for column in _INTEGER_COLUMNS:
            if column in row:
                row[column] = int(row[column]) if row[column] not in ("", None) else None
        row["value"] = float(row["value"])
    return upgrade_freeze_rows(rows)
