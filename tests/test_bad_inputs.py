"""Bad inputs a new user makes: each fails (or warns) with a message naming the argument or layer and the fix."""

from __future__ import annotations

import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_svcca import SVCCACallback, SVCCAMonitor, SVCCAMonitorWarning

from digits_models import DigitsCNN

LAYERS = ["relu1", "fc2"]


def _monitor(probe, **options):
    torch.manual_seed(0)
    return SVCCAMonitor(DigitsCNN(), probe=probe, layers=LAYERS, **options)


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        (torch.randn(32, 64), r"\(32, 64\) float32"),  # flattened images for a conv net: mat1 and mat2 / conv shapes
        (torch.randn(32, 1, 8, 8, dtype=torch.float64), r"\(32, 1, 8, 8\) float64"),  # dtype the model does not use
    ],
)
def test_probe_the_model_cannot_take_names_the_probe(probe, expected):
    monitor = _monitor(probe)
    with pytest.raises(ValueError, match=r"the probe's forward pass through the model \(DigitsCNN\) failed") as error:
        monitor.start()
    assert re.search(expected, str(error.value))  # the message shows what the probe holds
    assert "probe_input" in str(error.value) and "forward_fn" in str(error.value)


class _Flat(nn.Module):
    """A model with the digits CNN's layer names that takes flat 64-feature inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1 = nn.Sequential(nn.Linear(64, 8), nn.ReLU())
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc2(self.relu1(x))


def test_reference_model_that_cannot_take_the_probe_is_named():
    monitor = _monitor(torch.rand(32, 1, 8, 8), reference={"flat": _Flat()})
    with pytest.raises(ValueError, match=r"forward pass through reference 'flat' \(_Flat\) failed"):
        monitor.start()


def test_probe_on_the_meta_device_is_refused():
    monitor = _monitor(torch.empty(32, 1, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        monitor.start()


@pytest.mark.parametrize(("typo", "meant"), [("prevous", "previous"), ("finall", "final"), ("Initial", "initial")])
def test_misspelt_reference_names_get_a_close_match(typo, meant):
    with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
        SVCCACallback(probe=torch.zeros(4, 1, 8, 8), reference=typo)


class _Nested(nn.Module):
    """A block whose output nests a tuple in a tuple, and a head whose output is a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _NestedBlock()
        self.loss = _Scalar()

    def forward(self, x):
        out, _ = self.block(x)
        return self.loss(out)


class _NestedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 5)

    def forward(self, x):
        y = self.linear(x)
        return y, (torch.tanh(y), y.relu())


class _Scalar(nn.Module):
    def forward(self, x):
        return x.square().mean()


def test_nested_output_selection_says_how_to_select_inside():
    monitor = SVCCAMonitor(_Nested(), probe=torch.randn(64, 6), layers={"block": {"output": 1}}, baseline=False)
    with pytest.raises(TypeError, match=r"selects a tuple of 2 tensors.*output=\(1, 0\)"):
        monitor.start()


def test_a_path_selects_inside_nested_outputs():
    model = _Nested()
    probe = torch.randn(64, 6)
    monitor = SVCCAMonitor(
        model,
        probe=probe,
        layers={"block": {"output": [1, 0]}},
        reference={"tanh": torch.tanh(model.block.linear(probe)).detach()},
    )
    monitor.start()
    value = next(r["value"] for r in monitor.history if r["reference"] == "tanh" and r["metric"] == "svcca")
    assert value == pytest.approx(1.0, abs=1e-6)  # the selected output is the reference itself


def test_scalar_output_is_refused_with_the_layer_named():
    monitor = SVCCAMonitor(_Nested(), probe=torch.randn(64, 6), layers=["loss"])
    with pytest.raises(ValueError, match=r"layer 'loss'.*0-dim tensor"):
        monitor.start()


def test_probe_size_beyond_the_data_warns_when_asked_for_not_under_the_default():
    data = TensorDataset(torch.rand(100, 1, 8, 8), torch.zeros(100, dtype=torch.long))
    monitor = _monitor(DataLoader(data, batch_size=10), probe_size=2048)
    with pytest.warns(SVCCAMonitorWarning, match="holds only 100 samples"):
        monitor.prepare()
    assert monitor.probe.size == 100
    by_default = _monitor(DataLoader(data, batch_size=10))  # a small validation set: the default takes it all
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVCCAMonitorWarning)
        by_default.prepare()
    assert by_default.probe.size == 100


class _DictData(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"pixels": torch.rand(1, 8, 8, generator=generator), "label": torch.tensor(index % 10)}


class _DictCNN(DigitsCNN):
    validation_calls = 0

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["pixels"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        type(self).validation_calls += 1


def test_default_probe_from_dict_batches_fails_before_the_sanity_check(tmp_path):
    loader = DataLoader(_DictData(), batch_size=16)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        num_sanity_val_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SVCCACallback(layers=LAYERS)],
    )
    with pytest.raises(ValueError, match=r"(?s)forward pass through the model \(_DictCNN\) failed.*model\(\*\*probe\)"):
        trainer.fit(_DictCNN(), loader, loader)
    assert _DictCNN.validation_calls == 0


@pytest.mark.parametrize(
    ("cli_module", "demos_module", "class_path"),
    [
        ("pytorch_lightning.cli", "pytorch_lightning.demos.boring_classes", "lightning_svcca.SVCCACallback"),
        ("lightning.pytorch.cli", "lightning.pytorch.demos.boring_classes", "lightning_svcca.lightning.SVCCACallback"),
    ],
)
def test_lightning_cli_class_path_of_each_namespace(tmp_path, cli_module, demos_module, class_path):
    import importlib

    pytest.importorskip("jsonargparse")
    cli_class = importlib.import_module(cli_module).LightningCLI
    boring = importlib.import_module(demos_module).BoringModel
    callback = {"class_path": class_path, "init_args": {"layers": ["layer"], "reference": "previous", "probe_size": 32}}
    trainer_args = {
        "callbacks": [callback],
        "default_root_dir": str(tmp_path),
        "max_epochs": 2,
        "limit_train_batches": 2,
        "limit_val_batches": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    cli = cli_class(boring, run=False, args={"trainer": trainer_args}, save_config_callback=None)
    cli.trainer.fit(cli.model)
    svcca = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SVCCACallback")
    assert sorted({row["epoch"] for row in svcca.history}) == [0, 1, 2]
