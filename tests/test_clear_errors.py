"""Clear errors and warnings before and during the first measurements: an empty probe, a probe the forward pass
cannot take, a measurement too large for the machine's memory, and measurements that dominate the fit's time."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitorWarning
from lightning_svcca.monitoring import budget
from lightning_svcca.monitoring.monitor import SVCCAMonitor

X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(1))


class _MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _TakesDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["pixels"])


def _trainer(tmp_path: Any, callback: SVCCACallback, **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    return pl.Trainer(**{**kwargs, **overrides})


def test_an_empty_probe_loader_names_the_probe_and_the_fix() -> None:
    empty = DataLoader(TensorDataset(torch.empty(0, 16)), batch_size=8)
    with pytest.raises(ValueError, match="the probe DataLoader holds no samples") as error:
        SVCCAMonitor(_TakesDict(), probe=empty, layers=["net"]).start()
    assert "probe=<tensor, batch or a DataLoader with data>" in str(error.value)


def test_no_probe_and_an_empty_training_loader_name_the_probe(tmp_path: Any) -> None:
    empty = DataLoader(TensorDataset(torch.empty(0, 16), torch.empty(0, dtype=torch.long)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own about the empty loader
        with pytest.raises(ValueError, match="the probe DataLoader holds no samples.*probe=None"):
            _trainer(tmp_path, SVCCACallback()).fit(_MLP(), empty)


@pytest.mark.parametrize("probe", [(X, Y), [X], X], ids=["tuple", "list", "tensor"])
def test_a_forward_raising_lookup_errors_gets_the_probe_message(probe: Any) -> None:
    monitor = SVCCAMonitor(_TakesDict(), probe=probe, layers=["net"])
    with pytest.raises(ValueError, match="the probe's forward pass through the model .* failed") as error:
        monitor.start()
    assert isinstance(error.value.__cause__, (KeyError, IndexError, AttributeError, TypeError))
    assert "check probe, probe_input and forward_fn" in str(error.value)


def test_a_million_wide_layer_at_the_default_probe_size_needs_about_19_gib() -> None:
    rows, work = budget.layer_memory(datapoints=1024, width=1_000_000, storage_bytes=4, compute_bytes=8)
    assert 17 < (rows + work) / 2**30 < 20


def test_a_measurement_too_large_for_the_memory_is_warned_about_before_it_runs(monkeypatch) -> None:
    monkeypatch.setattr(budget, "machine_memory", lambda device: 8 * 2**20)  # 8 MiB: 25% is 2 MiB
    model = nn.Sequential(nn.Linear(16, 2048), nn.ReLU(), nn.Linear(2048, 4))
    monitor = SVCCAMonitor(model, probe=X, layers=["0", "2"])
    with pytest.warns(SVCCAMonitorWarning, match=r"measuring needs about .* GiB \('0' ") as caught:
        monitor.prepare()
    assert monitor.history == []  # before the first measurement
    message = str(next(w.message for w in caught if "measuring needs" in str(w.message)))
    assert "Lower probe_size (now 256) or max_datapoints" in message and "layers=..." in message
    monitor.close()


def test_measuring_every_step_warns_about_its_cost(tmp_path: Any, monkeypatch) -> None:
    monkeypatch.setattr(budget, "COST_MIN_SECONDS", 0.0)  # the run is short; its share of the fit is what counts
    callback = SVCCACallback(probe=X, every_n_train_steps=1)
    loader = DataLoader(TensorDataset(X, Y), batch_size=64)
    with pytest.warns(SVCCAMonitorWarning, match=r"measuring takes \d+% of the fit") as caught:
        _trainer(tmp_path, callback, limit_train_batches=4).fit(_MLP(), loader)
    message = str(next(w.message for w in caught if "measuring takes" in str(w.message)))
    assert "over 4 measurements" in message and "every_n_train_steps" in message
