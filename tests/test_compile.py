"""Compiled models: the probe, its hooks and reductions never make dynamo compile or recompile the user's model.

Dynamo's own counters count what was compiled: ``frames`` (functions dynamo converted) and ``stats.unique_graphs``.
A fit with the callback may compile no more than the same fit without it plus one eval pass under ``no_grad``
(what a validation step would compile), and dynamo prints nothing on the callback's account (graph breaks at
``zlib.crc32``, recompiles guarded on a layer's name, ``recompile_limit`` reached). The ``eager`` backend keeps
the tests fast on the CPU: dynamo traces and guards the same, only no code is generated.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor

from helpers import quiet_trainer

pytestmark = pytest.mark.slow

#: 9 monitored layers: the Linear and ReLU modules of a small MLP
LAYERS = [f"layers.{index}" for index in range(9)]
DYNAMO_NOISE = ("torch._dynamo", "recompile", "Graph break", "graph break")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        blocks = [module for _ in range(4) for module in (nn.Linear(16, 16), nn.ReLU())]
        self.layers = nn.Sequential(*blocks, nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CompiledInside(pl.LightningModule):
    """A LightningModule whose network is ``torch.compile`` d: its names are ``net._orig_mod.layers.N``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(MLP(), backend="eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def random_xy() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(256, 16, generator=generator), torch.randint(0, 4, (256,), generator=generator)


@pytest.fixture
def dynamo_counts(capfd: pytest.CaptureFixture[str]) -> Iterator[Callable[[], dict[str, object]]]:
    """``counts()``: what dynamo compiled since the test began, and what it printed or warned."""
    torch._dynamo.reset()
    counters.clear()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def counts() -> dict[str, object]:
            printed = capfd.readouterr().err + "".join(str(warning.message) for warning in caught)
            return {
                "frames": counters["frames"]["total"],
                "graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "noise": [line for line in printed.splitlines() if any(word in line for word in DYNAMO_NOISE)],
            }

        yield counts
    torch._dynamo.reset()


def _fit(
    data: tuple[torch.Tensor, torch.Tensor], tmp_path, callbacks: list, ckpt_path=None, **overrides
) -> CompiledInside:
    x, y = data
    model = CompiledInside()
    trainer = quiet_trainer(tmp_path, callbacks, **{"max_epochs": 2, "limit_train_batches": 4, **overrides})
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32), ckpt_path=ckpt_path)
    return model


def _eval_pass(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()


def test_lightning_module_with_compiled_network_compiles_nothing_for_the_callback(random_xy, tmp_path, dynamo_counts):
    plain = _fit(random_xy, tmp_path / "plain", [])
    _eval_pass(plain, random_xy[0][:64])
    without = dynamo_counts()
    torch._dynamo.reset()
    counters.clear()
    callback = SVCCACallback(probe=random_xy[0][:128], layers=[f"net.{name}" for name in LAYERS], reference="previous")
    _fit(random_xy, tmp_path / "monitored", [callback])
    monitored = dynamo_counts()
    assert monitored["graph_breaks"] == 0 and monitored["noise"] == [], monitored
    assert monitored["frames"] <= without["frames"] and monitored["graphs"] <= without["graphs"], (monitored, without)
    # the user's names (net.layers.N) resolve through the compiled module's `_orig_mod.`, and are the ones shown
    assert callback.monitor.layers == [f"net.{name}" for name in LAYERS]
    assert {row["layer"] for row in callback.history} == set(callback.monitor.layers)


def _named_callbacks(probe: torch.Tensor) -> tuple[SVCCACallback, SVCCACallback]:
    """Default layers freezing ``layers.0`` (scheduled under its ``_orig_mod.`` name), and two explicit layers."""
    schedule = FreezePolicy(mode="schedule", schedule={"net._orig_mod.layers.0": 1})
    defaults = SVCCACallback(probe=probe, reference="previous", freeze=schedule)
    explicit = SVCCACallback(probe=probe, layers=["net._orig_mod.layers.2", "net.layers.4"], reference="previous")
    return defaults, explicit


def test_a_compiled_submodule_is_named_without_orig_mod_from_fit_to_resume(random_xy, tmp_path, caplog):
    """Layers, history rows, metric tags, the CSV and the freeze log line name ``net.layers.N``: names written
    either way resolve to the compiled network's modules; the freeze holds its weights, also after a resume."""
    defaults, explicit = _named_callbacks(random_xy[0][:128])
    logger = defaults._logger()  # Lightning's logger does not propagate to caplog's root handler
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    try:
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        model = _fit(random_xy, tmp_path / "fit", [defaults, explicit, saver], enable_checkpointing=True)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)

    shown = [f"net.layers.{index}" for index in (0, 2, 4, 6, 8)]
    assert defaults.layers == shown and explicit.layers == ["net.layers.2", "net.layers.4"]
    assert {row["layer"] for row in defaults.history} == set(shown)
    assert {row["layer"] for row in explicit.history} == {"net.layers.2", "net.layers.4"}
    assert defaults.frozen == {"net.layers.0": 1}
    assert not model.net._orig_mod.layers[0].weight.requires_grad and model.net._orig_mod.layers[2].weight.requires_grad
    assert "svcca/previous/net.layers.2" in model.trainer.callback_metrics
    logged = [record.getMessage() for record in caplog.records]
    assert any("froze layer 'net.layers.0'" in line for line in logged), logged
    seen = [*logged, *model.trainer.callback_metrics, *(p.read_text() for p in (tmp_path / "fit").rglob("*.csv"))]
    assert not [text for text in seen if "_orig_mod" in text]

    # resumed for a third epoch: the same names continue, and the frozen layer's weights stay where they were
    frozen_weight = model.net._orig_mod.layers[0].weight.detach().clone()
    resumed, _ = _named_callbacks(random_xy[0][:128])
    model = _fit(random_xy, tmp_path / "resumed", [resumed], ckpt_path=tmp_path / "ckpt" / "last.ckpt", max_epochs=3)
    assert {row["layer"] for row in resumed.history} == set(shown)
    assert sorted({row["epoch"] for row in resumed.history}) == [0, 1, 2, 3]
    assert resumed.frozen == {"net.layers.0": 1}
    assert torch.equal(model.net._orig_mod.layers[0].weight, frozen_weight)


def _plain_loop(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], monitor: SVCCAMonitor | None) -> None:
    x, y = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if monitor is not None:
        monitor.start()
    step = 0
    for epoch in range(2):
        model.train()
        for start in range(0, 128, 32):
            loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        if monitor is not None:
            monitor.measure(epoch=epoch + 1, step=step)
    if monitor is not None:
        monitor.finish(epoch=2, step=step)


def test_compiled_plain_loop_model_compiles_nothing_for_the_monitor(random_xy, dynamo_counts):
    torch.manual_seed(0)
    plain = torch.compile(MLP(), backend="eager")
    _plain_loop(plain, random_xy, None)
    _eval_pass(plain, random_xy[0][:64])
    without = dynamo_counts()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(MLP(), backend="eager")
    with SVCCAMonitor(compiled, probe=random_xy[0][:128], layers=LAYERS, reference=("previous", "final")) as monitor:
        _plain_loop(compiled, random_xy, monitor)
    monitored = dynamo_counts()
    assert monitored["graph_breaks"] == 0 and monitored["noise"] == [], monitored
    assert monitored["frames"] <= without["frames"] and monitored["graphs"] <= without["graphs"], (monitored, without)
    # the monitor watches the model inside the compiled wrapper: the user's names, the same weights
    assert monitor.layers == LAYERS and monitor.model is compiled._orig_mod
    assert {row["layer"] for row in monitor.history} == set(LAYERS)
