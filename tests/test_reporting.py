"""Tests of lightning_svcca.output.reporting and writers.Reporter: history tables, convergence epochs, CSV, heatmaps."""

from __future__ import annotations

import math
import multiprocessing
import threading

import numpy as np
import pytest
from matplotlib import colormaps

from lightning_svcca.output.reporting import (
    HISTORY_COLUMNS,
    MAX_COLUMNS,
    HeatmapFigure,
    convergence_epochs,
    evenly_spaced,
    heatmap_image,
    heatmap_style,
    history_matrix,
    read_history_csv,
    similarity_position,
    tag,
    write_history_csv,
)
from lightning_svcca.output.writers import Reporter


def _row(epoch, layer, value, reference="final", metric="svcca"):
    return {"epoch": epoch, "step": epoch, "layer": layer, "reference": reference, "metric": metric, "value": value}


def _curve(layer, values, reference="final", metric="svcca", epochs=None):
    epochs = range(len(values)) if epochs is None else epochs
    return [_row(e, layer, v, reference, metric) for e, v in zip(epochs, values, strict=True)]


@pytest.fixture
def history():
    return (
        _curve("fc", [0.2, 0.5, 1.0])
        + _curve("conv", [0.6, 0.9, 1.0])
        + _curve("conv", [0.7, 0.8], reference="previous", epochs=[1, 2])
        + _curve("conv", [0.3, 0.4, 0.5], metric="linear_cka")
        + [_row(1, "conv", 4.0, reference="dims")]
    )


def test_tag():
    assert tag("svcca", "final", "encoder.layer.3") == "svcca/final/encoder.layer.3"


def test_history_matrix_selects_reference_and_metric(history):
    layers, epochs, matrix = history_matrix(history, "final", "svcca")
    assert layers == ["fc", "conv"]  # order of first appearance
    assert epochs == [0, 1, 2]
    np.testing.assert_array_equal(matrix, [[0.2, 0.5, 1.0], [0.6, 0.9, 1.0]])


def test_history_matrix_with_layer_order_and_gaps(history):
    layers, epochs, matrix = history_matrix(history, "previous", "svcca", layers=["fc", "conv", "missing"])
    assert layers == ["conv"]  # layers without rows are left out
    assert epochs == [1, 2]
    np.testing.assert_array_equal(matrix, [[0.7, 0.8]])
    rows = _curve("a", [0.1, 0.2, 0.3]) + _curve("b", [0.9], epochs=[2])
    layers, epochs, matrix = history_matrix(rows, "final", "svcca", layers=["b", "a"])
    assert layers == ["b", "a"]
    np.testing.assert_array_equal(matrix, [[np.nan, np.nan, 0.9], [0.1, 0.2, 0.3]])


def test_history_matrix_empty():
    layers, epochs, matrix = history_matrix([], "final", "svcca")
    assert layers == [] and epochs == [] and matrix.shape == (0, 0)


@pytest.mark.parametrize(
    ("values", "threshold", "expected"),
    [
        ([0.5, 0.95, 0.85, 0.92, 0.96], 0.9, 3),  # the spike at epoch 1 does not count
        ([0.5, 0.95, 0.85, 0.92, 0.96], 0.95, 4),
        ([0.91, 0.92, 0.93], 0.9, 0),
        ([0.2, 0.3, 0.4], 0.9, None),
        ([0.95, 0.95, 0.8], 0.9, None),  # dropped below at the end
        ([0.5, 0.9, 0.9], 0.9, 1),  # "at or above"
    ],
)
def test_convergence_epoch_is_the_first_from_which_it_stays_above(values, threshold, expected):
    result = convergence_epochs(_curve("fc", values), thresholds=(threshold,))
    assert result == {"fc": {threshold: expected}}


def test_convergence_epochs_per_layer_and_threshold(history):
    result = convergence_epochs(history, thresholds=(0.9, 0.95))
    assert result == {"fc": {0.9: 2, 0.95: 2}, "conv": {0.9: 1, 0.95: 2}}
    assert convergence_epochs(history, (0.45,), metric="linear_cka") == {"conv": {0.45: 2}}
    assert convergence_epochs(history, (0.5,), reference="previous", layers=["conv"]) == {"conv": {0.5: 1}}


def test_convergence_uses_measured_epochs_only():
    rows = _curve("fc", [0.1, 0.95, 0.97], epochs=[0, 2, 4])
    assert convergence_epochs(rows, (0.9,)) == {"fc": {0.9: 2}}


def test_csv_round_trip(tmp_path, history):
    extra = [{**_row(3, "fc", 0.123456789012345678), "ignored": "x"}]
    path = write_history_csv(history + extra, tmp_path / "sub" / "svcca_history.csv")
    assert path == tmp_path / "sub" / "svcca_history.csv"
    assert path.read_text().splitlines()[0] == ",".join(HISTORY_COLUMNS)
    rows = read_history_csv(path)
    assert rows == [dict(row) for row in history] + [_row(3, "fc", 0.123456789012345678)]
    assert all(isinstance(row["epoch"], int) and isinstance(row["value"], float) for row in rows)
    assert not list(path.parent.glob("*.partial"))


def test_csv_round_trip_of_special_values(tmp_path):
    rows = [_row(0, "a,b", math.nan), _row(1, 'quote"d', math.inf), _row(2, "x", -0.0)]
    back = read_history_csv(write_history_csv(rows, tmp_path / "h.csv"))
    assert [row["layer"] for row in back] == ["a,b", 'quote"d', "x"]
    assert math.isnan(back[0]["value"]) and back[1]["value"] == math.inf


def _writer(path, rows, times, errors):
    try:
        for _ in range(times):
            write_history_csv(rows, path)
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


def test_csv_writers_sharing_a_directory_never_collide(tmp_path):
    # two runs rewriting the same file over and over: each write goes through its own temporary name (process id
    # and UUID), so none fails and the file always holds one whole history, never a mix or a torn one
    path = tmp_path / "svcca_history.csv"
    histories = [_curve("a", [0.1] * 50), _curve("b", [0.2] * 80)]
    errors = []
    threads = [threading.Thread(target=_writer, args=(path, rows, 60, errors)) for rows in histories]
    for thread in threads:
        thread.start()
    for _ in range(200):  # readers meanwhile see one complete file or the other
        if path.exists():
            assert read_history_csv(path) in histories
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_history_csv(path) in histories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svcca_history.csv"]  # no temporary file left


def test_csv_writers_in_two_processes(tmp_path):
    path = tmp_path / "svcca_history.csv"
    histories = [_curve("a", [0.1] * 50), _curve("b", [0.2] * 80)]
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=write_history_csv_many, args=(path, rows, 40)) for rows in histories]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert read_history_csv(path) in histories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svcca_history.csv"]


def write_history_csv_many(path, rows, times):
    for _ in range(times):
        write_history_csv(rows, path)


def test_csv_failed_write_keeps_the_old_file(tmp_path, history):
    path = write_history_csv(history, tmp_path / "svcca_history.csv")

    def broken():
        yield _row(0, "x", 0.5)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_history_csv(broken(), path)
    assert read_history_csv(path) == history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svcca_history.csv"]


def test_csv_with_a_step_column(tmp_path):
    rows = [{**_row(1, "fc", 0.5), "step": 40}, {**_row(2, "fc", 0.7), "step": 80}]
    path = write_history_csv(rows, tmp_path / "h.csv")
    assert path.read_text().splitlines()[0] == "epoch,step,layer,reference,metric,value"
    assert read_history_csv(path) == rows


# ----------------------------------------------------------------------------------------------------------------
# heatmaps
# ----------------------------------------------------------------------------------------------------------------

LONG_NAMES = [f"encoder.layer.{i}.attention.output.dense" for i in range(12)]


def _cielab(rgb):
    """sRGB in [0, 1] -> CIELAB (D65), the textbook formulas."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = to_xyz @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _cell_colour(figure, image, i, j):
    """The RGB colour drawn for cell (layer i, column j), read off a corner of the cell (the middle holds text)."""
    axes = figure.figure.axes[0]
    x, y = axes.transData.transform((j - 0.35, i - 0.35))
    return image[image.shape[0] - 1 - round(y), round(x)].astype(int)


@pytest.mark.parametrize(("n_layers", "n_epochs"), [(1, 1), (3, 4), (12, 60)])
def test_heatmap_image_is_an_rgb_array(n_layers, n_epochs):
    matrix = np.linspace(0, 1, n_layers * n_epochs).reshape(n_layers, n_epochs)
    matrix[0, 0] = np.nan
    image = heatmap_image([f"layer{i}" for i in range(n_layers)], list(range(n_epochs)), matrix, title="t", label="l")
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.dtype == np.uint8
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0  # something was drawn


def test_similarity_position_is_the_log_of_one_minus_the_value():
    values = np.array([-0.2, 0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0, 1.0 + 1e-9, np.nan])
    # by hand: log10(1 - v) / log10(0.001), clipped to [0, 1]
    expected = [0.0, 0.0, 0.30103 / 3, 1 / 3, 1.30103 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, np.nan]
    np.testing.assert_allclose(similarity_position(values), expected, atol=1e-5)


def test_heatmap_colours_separate_the_convergence_band():
    # 0.90, 0.95, 0.99 and 1.0 must get distinct colours (on a linear 0-1 scale all four are the same yellow);
    # each cell is viridis at the position computed by hand
    values = [0.5, 0.9, 0.95, 0.99, 1.0]
    figure = HeatmapFigure(title="svcca to final", label="svcca")
    image = figure.render(["layer"], list(range(len(values))), np.array([values]))
    colours = [_cell_colour(figure, image, 0, j) for j in range(len(values))]
    positions = [0.30103 / 3, 1 / 3, 1.30103 / 3, 2 / 3, 1.0]
    for colour, position in zip(colours, positions, strict=True):
        expected = np.round(np.array(colormaps["viridis"](position)[:3]) * 255)
        np.testing.assert_allclose(colour, expected, atol=3)
    lab = [_cielab(colour / 255) for colour in colours]
    for a in range(len(values)):
        for b in range(a + 1, len(values)):
            # CIE76 colour difference: 2.3 is just noticeable; neighbours here differ by 20 and more
            assert np.linalg.norm(lab[a] - lab[b]) > 15, (values[a], values[b])


def test_heatmap_size_does_not_depend_on_the_epochs():
    layers = ["conv1", "conv2", "fc"]
    rng = np.random.default_rng(0)
    shapes = {
        heatmap_image(layers, list(range(n)), rng.random((3, n)), title="t", label="svcca").shape
        for n in (1, 2, 7, 30, MAX_COLUMNS, MAX_COLUMNS + 1, 500)
    }
    assert len(shapes) == 1
    figure = HeatmapFigure(title="svcca to final", label="svcca")  # redrawn every epoch, as the callback does
    shapes = {figure.render(layers, list(range(n)), rng.random((3, n))).shape for n in range(1, 40, 3)}
    assert shapes == {next(iter(shapes))}


def test_heatmap_thins_long_runs_to_evenly_spaced_epochs():
    columns = evenly_spaced(range(1000), MAX_COLUMNS)
    assert len(columns) == MAX_COLUMNS and columns[0] == 0 and columns[-1] == 999
    assert np.all(np.diff(columns) >= 9) and np.all(np.diff(columns) <= 11)
    assert evenly_spaced(range(7), MAX_COLUMNS) == list(range(7))
    figure = HeatmapFigure(title="t", label="svcca")
    epochs = list(range(0, 1000, 4))
    figure.render(["a"], epochs, np.linspace(0, 1, len(epochs))[None, :])
    axes = figure.figure.axes[0]
    assert axes.get_xlabel() == f"epoch ({MAX_COLUMNS} of 250 measured shown)"
    ticks = [text.get_text() for text in axes.get_xticklabels()]
    assert ticks[0] == "0" and all(int(t) % 100 == 0 for t in ticks)  # round epochs
    assert axes.get_ylabel() and axes.get_images()[0].get_array().shape == (1, MAX_COLUMNS)


@pytest.mark.parametrize("n_epochs", [3, 250])
def test_heatmap_labels_are_never_clipped(n_epochs):
    names = [*LONG_NAMES, "model.backbone.stages.3.blocks.27.mixer.attention.output_projection.dense"]
    matrix = np.full((len(names), n_epochs), 0.97)
    matrix[2, 1] = np.nan  # adds a note to the x label
    figure = HeatmapFigure(title="linear_cka to pretrained", label="linear_cka")
    image = figure.render(names, list(range(n_epochs)), matrix)
    renderer = figure.figure.canvas.get_renderer()
    height, width = image.shape[:2]
    for axes in figure.figure.axes:  # the map and the colour bar, with every tick label, axis label and title
        box = axes.get_tightbbox(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (axes, box)
    heatmap, bar = figure.figure.axes
    assert [text.get_text() for text in heatmap.get_yticklabels()] == names
    assert heatmap.get_ylabel().startswith("layer") and "epoch" in heatmap.get_xlabel()
    assert "linear_cka" in bar.get_ylabel()
    texts = [heatmap.xaxis.label, heatmap.yaxis.label, bar.yaxis.label, *heatmap.get_yticklabels()]
    for text in texts:  # and each text on its own (the tight box of a whole axes could hide one)
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text.get_text()


def test_heatmap_annotates_small_maps_with_cut_values():
    figure = HeatmapFigure(title="t", label="svcca")
    figure.render(["a"], [0, 1, 2, 3, 4], np.array([[0.8996, 0.95, 0.9999999999, 1.0, np.nan]]))
    assert [text.get_text() for text in figure.figure.axes[0].texts] == [".899", ".950", "1", "1"]
    narrow = HeatmapFigure(title="t", label="svcca")  # 60 cells, but too narrow for legible text
    narrow.render(["a", "b"], list(range(30)), np.full((2, 30), 0.5))
    assert len(narrow.figure.axes[0].texts) == 0


def test_dims_heatmap_has_a_linear_scale_of_its_own():
    style = heatmap_style("svcca", "dims")
    assert style == {"title": "directions kept by svcca", "label": "directions kept", "scale": "linear"}
    dims = np.array([[12.0, 16.0, 16.0], [28.0, 32.0, 32.0], [45.0, 48.0, 50.0]])
    figure = HeatmapFigure(**style)
    image = figure.render(["relu1", "relu2", "relu3"], [0, 1, 2], dims)
    for i in range(3):
        for j in range(3):
            position = (dims[i, j] - 12.0) / (50.0 - 12.0)  # the values' own range
            expected = np.round(np.array(colormaps["cividis"](position)[:3]) * 255)
            np.testing.assert_allclose(_cell_colour(figure, image, i, j), expected, atol=3)
    bar = figure.figure.axes[1]
    ticks = [float(t) for t in bar.get_yticks() if 12 <= t <= 50]
    assert ticks and all(t == int(t) for t in ticks)  # whole directions
    assert [text.get_text() for text in figure.figure.axes[0].texts][:3] == ["12", "16", "16"]


def test_heatmap_styles():
    assert heatmap_style("linear_cka", "final") == {
        "title": "linear_cka to final",
        "label": "linear_cka",
        "scale": "similarity",
    }
    assert heatmap_style("svcca", "baseline")["scale"] == "linear"
    assert heatmap_style("svcca", "frozen")["scale"] == "linear"
    with pytest.raises(ValueError, match="scale must be"):
        HeatmapFigure(title="t", label="l", scale="log")
    with pytest.raises(ValueError, match=r"one row per layer and one column per epoch, \(2, 3\), got shape \(3, 2\)"):
        heatmap_image(["a", "b"], [0, 1, 2], np.zeros((3, 2)), title="t", label="l")


class _FakeExperiment:
    def __init__(self):
        self.images, self.texts, self.layouts, self.flushes = [], [], [], 0

    def add_image(self, name, image, step, dataformats):
        self.images.append((name, image.shape, step, dataformats))

    def add_text(self, name, message, step):
        self.texts.append((name, message, step))

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)

    def flush(self):
        self.flushes += 1


class _FakeLogger:
    """What Reporter needs of a Lightning logger: log_metrics, and optionally a TensorBoard-like experiment."""

    def __init__(self, experiment=None):
        self.calls = []
        self.experiment = experiment

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))


def test_reporter_scalars_one_call_per_epoch(history):
    logger = _FakeLogger()
    Reporter([logger], None).scalars(history)
    assert [step for _, step in logger.calls] == [0, 1, 2]
    by_step = {step: metrics for metrics, step in logger.calls}
    assert by_step[1] == {
        "svcca/final/fc": 0.5,
        "svcca/final/conv": 0.9,
        "svcca/previous/conv": 0.7,
        "linear_cka/final/conv": 0.4,
        "svcca/dims/conv": 4.0,
    }
    assert by_step[0] == {"svcca/final/fc": 0.2, "svcca/final/conv": 0.6, "linear_cka/final/conv": 0.3}


def test_reporter_scalars_reach_every_logger(history):
    loggers = [_FakeLogger(), _FakeLogger()]
    Reporter(loggers, None).scalars(_curve("fc", [0.3], epochs=[5]))
    for logger in loggers:
        assert logger.calls == [({"svcca/final/fc": 0.3}, 5)]


def test_reporter_tensorboard_extras_by_duck_typing(history):
    experiment = _FakeExperiment()
    plain = _FakeLogger(experiment=object())  # e.g. a CSV logger: no images
    logger = _FakeLogger(experiment)
    reporter = Reporter([plain, logger], None)
    reporter.heatmap(history, reference="final", metric="svcca", layers=["conv", "fc"], step=2)
    reporter.heatmap(history, reference="initial", metric="svcca", layers=["conv"], step=2)  # no rows: nothing
    reporter.layout([("svcca", "final"), ("svcca", "dims")], ["conv", "fc.1"])
    reporter.text("svcca/freeze", "froze conv", 3)
    reporter.flush()
    assert len(experiment.images) == 1
    name, shape, step, dataformats = experiment.images[0]
    assert (name, step, dataformats) == ("svcca/final/heatmap", 2, "HWC") and shape[2] == 3
    assert experiment.layouts == [
        {
            "svcca": {
                "svcca/final": ["Multiline", [r"^svcca/final/conv$", r"^svcca/final/fc\.1$"]],
                "svcca/dims": ["Multiline", [r"^svcca/dims/conv$", r"^svcca/dims/fc\.1$"]],
            }
        }
    ]
    assert experiment.texts == [("svcca/freeze", "froze conv", 3)]
    assert experiment.flushes == 1


def test_reporter_without_loggers(tmp_path, history):
    reporter = Reporter([], tmp_path / "svcca_history.csv")
    reporter.scalars(history)
    reporter.heatmap(history, reference="final", metric="svcca", layers=["fc"], step=1)
    reporter.layout([("svcca", "final")], ["fc"])
    reporter.text("svcca/freeze", "x", 0)
    reporter.flush()
    reporter.write_csv(history)
    assert reporter.csv_path == tmp_path / "svcca_history.csv"
    assert read_history_csv(reporter.csv_path) == history


def test_reporter_without_log_dir_writes_no_file(tmp_path, monkeypatch, history):
    monkeypatch.chdir(tmp_path)
    reporter = Reporter([], None)
    reporter.write_csv(history)
    assert reporter.csv_path is None
    assert not list(tmp_path.iterdir())


def test_heatmaps_past_their_time_share_wait_and_flush_draws_the_latest(history, monkeypatch):
    """Drawing takes 1 s of a clock that the 'training' advances by 2 s between measurements: at a 10% share,
    heatmaps wait until the time drawn is back under 10% of the time passed; flush draws the latest waiting one at
    its own step."""
    import lightning_svcca.output.writers as writers

    clock = [0.0]
    monkeypatch.setattr(writers.time, "perf_counter", lambda: clock[0])
    render = writers.HeatmapFigure.render

    def slow_render(self, *args):
        clock[0] += 1.0
        return render(self, *args)

    monkeypatch.setattr(writers.HeatmapFigure, "render", slow_render)
    experiment = _FakeExperiment()
    reporter = Reporter([_FakeLogger(experiment)], None, heatmap_time_share=0.1)
    returned = []
    for step in range(5):
        clock[0] += 2.0
        rows = [row for row in history if row["epoch"] <= min(step, 2)]
        returned.append(reporter.heatmap(rows, reference="final", metric="svcca", layers=["conv", "fc"], step=step))
    # drawn at 2 s (then 1 s drawn), waits at 5, 7 and 9 s (1 s is over 10%), drawn at 11 s (1 s is not)
    assert [step for _, _, step, _ in experiment.images] == [0, 4]
    assert [image is None for image in returned] == [False, True, True, True, False]
    clock[0] += 2.0
    reporter.heatmap(history, reference="final", metric="svcca", layers=["conv", "fc"], step=5)  # 2 s of 14: waits
    reporter.flush()
    assert [step for _, _, step, _ in experiment.images] == [0, 4, 5]
    reporter.flush()  # nothing waits any more
    assert len(experiment.images) == 3


def test_a_heatmap_time_share_of_one_draws_every_heatmap(history):
    experiment = _FakeExperiment()
    reporter = Reporter([_FakeLogger(experiment)], None, heatmap_time_share=1.0)
    for step in range(4):
        reporter.heatmap(history, reference="final", metric="svcca", layers=["conv", "fc"], step=step)
    assert [step for _, _, step, _ in experiment.images] == [0, 1, 2, 3]


def test_a_history_csv_cut_mid_row_leaves_its_last_row_out_with_a_warning(tmp_path, history):
    """A cut file was read silently, its last value as a number it never held (0.2656479872344012 as 0.2656...3440)."""
    from lightning_svcca.core.safe_files import FileTrustWarning

    path = write_history_csv(history, tmp_path / "svcca_history.csv")
    text = path.read_text()
    assert read_history_csv(path) == [dict(row) for row in history]
    path.write_text(text[:-4])  # cut inside the last row's value
    with pytest.warns(FileTrustWarning, match="ends in the middle of a row"):
        assert read_history_csv(path) == [dict(row) for row in history[:-1]]
