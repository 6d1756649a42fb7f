"""Rows are paired by probe sample: a layer that ran on part of the probe is skipped, never compared misaligned."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_svcca import SVCCAMonitorWarning
from lightning_svcca.monitoring.monitor import SVCCAMonitor


class _Conditional(nn.Module):
    """``gated`` runs on one of the probe's two chunks: chunk ``run_on`` (counted from ``calls = 0``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, 16)
        self.gated = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        self.run_on, self.calls = 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        if self.calls % 2 == self.run_on:
            h = h + self.gated(h)
        self.calls += 1
        return self.head(h)


def test_a_layer_run_on_alternating_probe_chunks_is_skipped_with_a_warning() -> None:
    model = _Conditional()
    probe = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    monitor = SVCCAMonitor(
        model, probe=probe, layers=["stem", "gated"], reference=["previous"], probe_batch_size=128, baseline=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.prepare()
        for epoch in range(3):
            model.run_on, model.calls = epoch % 2, 0  # the layer runs on chunk 0, then chunk 1, then chunk 0
            if epoch == 0:
                monitor.start()
            else:
                monitor.measure(epoch=epoch, step=epoch)
    previous = {(row["epoch"], row["layer"]) for row in monitor.history if row["reference"] == "previous"}
    assert previous == {(1, "stem"), (2, "stem")}  # never a value for the half-run layer
    assert not [row for row in monitor.history if row["layer"] == "gated"]
    assert [(epoch, layer) for epoch, layer, _ in monitor.skipped] == [(0, "gated"), (1, "gated"), (2, "gated")]
    (message,) = [str(w.message) for w in caught if issubclass(w.category, SVCCAMonitorWarning)]
    assert "'gated' skipped at epoch 0: it ran on 1 of the probe's 2 chunks only" in message
    monitor.close()
