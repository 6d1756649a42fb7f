"""A measurement near its floor: the benchmark runs, heatmaps draw off the training thread, live ``final`` is lazy.

``benchmarks/measurement_floor.py --quick`` prints its measurement/floor table and the fit overhead; heatmaps are
drawn and sent to the writers that take images on the drawing thread, and a writer that raised there is dropped on
the caller's thread (at the next call, or at flush); the live ``final`` heatmap's comparisons are only computed when
a picture is drawn.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_benchmarks import run_quick, table
from torch import nn

from lightning_svcca import SVCCAMonitor
from lightning_svcca.output import drawing
from lightning_svcca.output.writers import Reporter, WriterWarning


def test_measurement_floor_quick_prints_the_table_and_the_overhead(capsys):
    _, lines = run_quick(capsys, "measurement_floor")
    rows = table(lines, "width layers probe")
    assert [(row[0], row[1]) for row in rows] == [("64", "1"), ("64", "4"), ("256", "1"), ("256", "4")]
    assert all(float(row[5]) > 0 and float(row[8]) > 0 for row in rows)  # wall and CPU ratios
    assert any(line.strip().startswith("overhead ratio") for line in lines)


class _Experiment:
    """A TensorBoard-like experiment recording which thread called ``add_image``."""

    def __init__(self) -> None:
        self.images: list[tuple[str, int, str]] = []

    def add_image(self, name, image, step, dataformats):
        self.images.append((name, step, threading.current_thread().name))


class _Logger:
    def __init__(self, experiment) -> None:
        self.experiment = experiment

    def log_metrics(self, metrics, step):
        pass


def _rows(epochs):
    return [
        {"epoch": e, "step": e, "layer": layer, "reference": "previous", "metric": "svcca", "value": 0.5}
        for e in epochs
        for layer in ("a", "b")
    ]


def test_background_heatmaps_are_drawn_and_written_off_the_training_thread(monkeypatch):
    drawn_in: list[str] = []
    render = drawing.HeatmapFigure.render

    def recording_render(self, *args):
        drawn_in.append(threading.current_thread().name)
        return render(self, *args)

    monkeypatch.setattr(drawing.HeatmapFigure, "render", recording_render)
    experiment = _Experiment()
    reporter = Reporter([_Logger(experiment)], None, background=True)
    for step in (1, 2, 3):
        returned = reporter.heatmap(
            _rows(range(1, step + 1)), reference="previous", metric="svcca", layers=["a", "b"], step=step
        )
        assert returned is None  # drawn and written in the background
    reporter.flush()
    main = threading.current_thread().name
    assert [step for _, step, _ in experiment.images] == [1, 2, 3]
    assert drawn_in and main not in drawn_in
    assert {thread for _, _, thread in experiment.images} == set(drawn_in)  # written where drawn
    # the end-of-fit picture is returned at once
    image = reporter.heatmap(
        _rows([1, 2, 3, 4]), reference="previous", metric="svcca", layers=["a", "b"], step=4, always=True
    )
    assert image is not None and image.ndim == 3 and experiment.images[-1][1] == 4


def test_the_end_of_fit_picture_is_not_written_again_when_the_last_measurement_drew_it():
    experiment = _Experiment()
    reporter = Reporter([_Logger(experiment)], None, background=True)
    rows = _rows([1, 2, 3])
    reporter.heatmap(rows, reference="previous", metric="svcca", layers=["a", "b"], step=3)  # still drawing
    image = reporter.heatmap(rows, reference="previous", metric="svcca", layers=["a", "b"], step=3, always=True)
    reporter.flush()
    assert image is not None and [step for _, step, _ in experiment.images] == [3]


class _FullDiskExperiment(_Experiment):
    def add_image(self, name, image, step, dataformats):
        super().add_image(name, image, step, dataformats)
        raise OSError(28, "No space left on device")


def test_a_writer_failing_on_the_drawing_thread_is_dropped_on_the_callers_with_one_warning():
    failing, healthy = _FullDiskExperiment(), _Experiment()
    reporter = Reporter([_Logger(failing), _Logger(healthy)], None, background=True)
    with pytest.warns(WriterWarning, match="No space left on device") as caught:
        for step in (1, 2, 3):
            reporter.heatmap(
                _rows(range(1, step + 1)), reference="previous", metric="svcca", layers=["a", "b"], step=step
            )
            reporter.flush()  # the drawing finished: the failure reaches this thread
    assert len([w for w in caught if issubclass(w.category, WriterWarning)]) == 1
    assert [step for _, step, _ in failing.images] == [1]  # dropped after its first failure
    assert [step for _, step, _ in healthy.images] == [1, 2, 3]


def test_live_final_comparisons_only_when_a_picture_is_drawn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    monitor = SVCCAMonitor(model, probe=torch.randn(128, 8), layers=["1", "2"], baseline=False)
    monitor.start()
    calls = []
    against_point = monitor._comparisons.against_point
    monitor._comparisons.against_point = lambda *args, **kwargs: calls.append(args) or against_point(*args, **kwargs)
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(0.1 * torch.randn_like(model[0].weight))
        monitor.measure(epoch=epoch, step=epoch)
    assert calls == []  # no writer takes images: the live final heatmap is never computed
    rows = monitor.finish(epoch=3, step=3)
    assert {row["reference"] for row in rows} == {"final"} and len(calls) == 1
    monitor.close()


def test_the_live_final_picture_leaves_the_measures_computed_from_the_datapoints_to_the_end():
    """RSA on thousands of datapoints takes seconds a comparison: drawn live, on rank zero alone, the other processes
    waited for it at every measurement. Its final picture comes at the end, when every process compares."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    experiment = _Experiment()
    monitor = SVCCAMonitor(
        model,
        probe=torch.randn(128, 8),
        layers=["1", "2"],
        metrics=("svcca", "rsa"),
        writers=[_Logger(experiment)],
        heatmap_time_share=1.0,
    )
    monitor.start()
    for epoch in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(0.1 * torch.randn_like(model[0].weight))
        monitor.measure(epoch=epoch, step=epoch)
    monitor.finish(epoch=3, step=3)
    monitor.close()
    steps = {name: sorted({step for n, step, _ in experiment.images if n == name}) for name, _, _ in experiment.images}
    assert steps["svcca/final/heatmap"] == [1, 2, 3]  # live at each measurement after the first, and at the end
    assert steps["rsa/final/heatmap"] == [3]  # the end only
    assert steps["rsa/previous/heatmap"] == [1, 2, 3]  # its other pictures are drawn from the history, as before
