"""What the defaults report is informative: default layers too wide for the probe are left out (once, with a log
line), the ``final`` values reach ``trainer.callback_metrics``, and freeze state has its own metric name."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor, SVCCAMonitorWarning


def _wide_mlp() -> nn.Module:
    """An 8-wide input to a 64-wide hidden layer: on a 40-sample probe layer "2" keeps about 30 directions."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


def _measure_once(layers, caplog) -> tuple[SVCCAMonitor, list[str]]:
    probe = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    caplog.set_level(logging.INFO, logger="lightning_svcca")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = SVCCAMonitor(_wide_mlp(), probe=probe, layers=layers, baseline=False)
        monitor.start()
        monitor.measure(epoch=1, step=1)
        monitor.close()
    return monitor, [str(w.message) for w in caught if issubclass(w.category, SVCCAMonitorWarning)]


def test_a_default_layer_with_too_few_datapoints_is_left_out_with_one_log_line(caplog):
    monitor, warned = _measure_once(None, caplog)
    assert monitor.layers == ["0", "4"]
    assert {row["layer"] for row in monitor.history} == {"0", "4"}
    lines = [r.getMessage() for r in caplog.records if "leaves" in r.getMessage()]
    assert len(lines) == 1 and "'2' (40 datapoints for " in lines[0] and "fewer than 2" in lines[0]
    assert not [message for message in warned if "'2'" in message]


def test_an_explicit_layer_with_too_few_datapoints_is_kept_and_warned_about(caplog):
    monitor, warned = _measure_once(["0", "2", "4"], caplog)
    assert monitor.layers == ["0", "2", "4"]
    assert not [r for r in caplog.records if "leaves" in r.getMessage()]
    assert any("layer '2': SVCCA keeps" in message for message in warned)


@pytest.mark.filterwarnings("ignore::lightning_svcca.SVCCAMonitorWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning")
def test_final_values_and_freeze_state_reach_callback_metrics(digits, digits_loaders, digits_cnn, make_trainer):
    """After fit: ``svcca/final/{layer}`` is the first measurement against the final weights; freeze rows are
    ``metric="freeze", reference="frozen"`` (tag ``freeze/frozen/{layer}``), never an SVCCA value."""
    torch.manual_seed(0)
    callback = SVCCACallback(
        probe=digits[0][1000:1256],
        layers=["relu1", "relu2", "fc1"],
        freeze=FreezePolicy(mode="schedule", schedule={"relu1": 1}),
        max_datapoints=512,
    )
    trainer = make_trainer([callback], logger=False)
    trainer.fit(digits_cnn(), *digits_loaders)
    metrics = trainer.callback_metrics
    final = {row["layer"]: row["value"] for row in callback.history if row["reference"] == "final" and not row["epoch"]}
    assert set(final) == {"relu1", "relu2", "fc1"}
    for layer, value in final.items():
        assert metrics[f"svcca/final/{layer}"].item() == pytest.approx(value)
    assert metrics["svcca/final/min_over_layers"].item() == pytest.approx(min(final.values()))
    frozen = [row for row in callback.history if row["reference"] == "frozen"]
    assert frozen and {row["metric"] for row in frozen} == {"freeze"}
    assert metrics["freeze/frozen/relu1"].item() == 1.0 and metrics["freeze/frozen/fc1"].item() == 0.0
    assert not [name for name in metrics if name.startswith("svcca/frozen/")]
