"""Wrapped models: names resolve through torch.compile, DataParallel / DDP and PEFT wrappers, with suggestions;
a dict probe is called as ``model(**probe)`` whatever its number of keys."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_svcca import SVCCACallback, SVCCAMonitor
from lightning_svcca.pipeline.layers import find_module_name, resolve_layers
from lightning_svcca.pipeline.wrappers import unwrap_model, user_names


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Holder(nn.Module):
    """A parent whose network sits inside a wrapper, as a LightningModule's ``self.net = torch.compile(...)``."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.net = wrap(Net())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _peft(model: nn.Module) -> nn.Module:
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["fc1"]))


WRAPPERS = {
    "compile": lambda net: torch.compile(net, backend="eager"),
    "data_parallel": nn.DataParallel,
}


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_names_resolve_through_a_nested_wrapper_with_suggestions(kind: str) -> None:
    holder = Holder(WRAPPERS[kind])
    inner = "_orig_mod" if kind == "compile" else "module"
    specs = resolve_layers(holder, ["net.fc1", f"net.{inner}.fc2"], "positions")
    # a compiled module's `_orig_mod.` is left out of the monitored names; DataParallel's `module.` stays
    shown = "net" if kind == "compile" else f"net.{inner}"
    assert [spec.name for spec in specs] == [f"{shown}.fc1", f"{shown}.fc2"]
    assert user_names(holder)[f"net.{inner}.fc1"] == "net.fc1"
    with pytest.raises(ValueError, match=r"'net.fc3'.*did you mean \['net.fc2', 'net.fc1'") as raised:
        find_module_name(holder, "net.fc3")
    assert f"{inner}." not in str(raised.value)  # suggestions are the user's names


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_top_level_wrapper_is_looked_through(kind: str) -> None:
    net = Net()
    wrapped = WRAPPERS[kind](net)
    assert unwrap_model(wrapped) is net
    monitor = SVCCAMonitor(wrapped, probe=torch.randn(64, 6))
    assert monitor.model is net and monitor.layers == ["fc1", "fc2"]
    assert SVCCAMonitor(wrapped, probe=torch.randn(64, 6), layers=["_orig_mod.fc1", "module.fc2"]).layers == [
        "fc1",
        "fc2",
    ]


def test_peft_names_resolve_and_the_probe_runs_through_the_peft_model() -> None:
    model = _peft(Net())
    assert unwrap_model(model) is model  # its forward does more than call the base model: kept
    specs = resolve_layers(model, ["fc1", "act"], "positions")
    assert [spec.name for spec in specs] == ["base_model.model.fc1", "base_model.model.act"]
    with pytest.raises(ValueError, match=r"did you mean \['fc1'"):
        resolve_layers(model, ["fc_1"], "positions")


def _short_fit(model: nn.Module, monitor: SVCCAMonitor, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    monitor.start()
    for epoch in range(2):
        for start in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        monitor.measure(epoch=epoch + 1, step=(epoch + 1) * 4)
    monitor.finish(epoch=2, step=8)


@pytest.mark.parametrize("kind", ["data_parallel", "peft"])
def test_wrapped_model_trains_with_the_users_names(kind: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    model = nn.DataParallel(Net()) if kind == "data_parallel" else _peft(Net())
    with SVCCAMonitor(model, probe=x, layers=["fc1", "act", "fc2"], reference=("previous", "final")) as monitor:
        _short_fit(model, monitor, x, y)
    previous = [row for row in monitor.history if row["reference"] == "previous" and row["metric"] == "svcca"]
    assert len(previous) == 6 and all(0.0 < row["value"] <= 1.0 + 1e-9 for row in previous)


class KeywordNet(pl.LightningModule):
    """Takes its batch as keywords, as ``forward(self, **batch)``; trains on (x, y) tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch["pixel_values"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(pixel_values=x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TensorNet(KeywordNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_single_key_dict_probe_is_called_with_keywords(make_trainer) -> None:
    x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    callback = SVCCACallback(probe={"pixel_values": x}, layers=["net.fc1", "net.fc2"])
    make_trainer([callback]).fit(KeywordNet(), loader)
    assert {row["layer"] for row in callback.history} == {"net.fc1", "net.fc2"}
    # a model taking a tensor: the rule is in the error, and probe_input names the input
    with pytest.raises(ValueError, match=r"model\(\*\*probe\), whatever its number of keys; probe_input=<key>"):
        make_trainer([SVCCACallback(probe={"pixel_values": x}, layers=["net.fc1"])]).fit(TensorNet(), loader)
    callback = SVCCACallback(probe={"pixel_values": x}, probe_input="pixel_values", layers=["net.fc1"])
    make_trainer([callback]).fit(TensorNet(), loader)
    assert {row["layer"] for row in callback.history} == {"net.fc1"}
