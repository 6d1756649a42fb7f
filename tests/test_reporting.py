"""Tests of lightning_svcca.reporting: history tables, convergence epochs, CSV files, heatmaps and the Reporter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_svcca.reporting import (
    HISTORY_COLUMNS,
    Reporter,
    convergence_epochs,
    heatmap_image,
    history_matrix,
    read_history_csv,
    tag,
    write_history_csv,
)


def _row(epoch, layer, value, reference="final", metric="svcca"):
    return {"epoch": epoch, "layer": layer, "reference": reference, "metric": metric, "value": value}


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


@pytest.mark.parametrize(("n_layers", "n_epochs"), [(1, 1), (3, 4), (12, 60)])
def test_heatmap_image_is_an_rgb_array(n_layers, n_epochs):
    matrix = np.linspace(0, 1, n_layers * n_epochs).reshape(n_layers, n_epochs)
    matrix[0, 0] = np.nan
    image = heatmap_image([f"layer{i}" for i in range(n_layers)], list(range(n_epochs)), matrix, title="t", label="l")
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.dtype == np.uint8
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0  # something was drawn


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
    reporter = Reporter([], tmp_path)
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
