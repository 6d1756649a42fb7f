"""Cross-layer maps over a run (the SVCCA paper's Fig. 4): moments kept, maps against the final model, outputs."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, svcca
from lightning_svcca.output.reporting import read_history_csv
from lightning_svcca.pipeline.moments import CrossLayerMoments

from digits_models import DigitsCNN, digits_tensors

LAYERS = ["relu1", "relu2", "fc1", "fc2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    (x_train, y_train), (x_probe, _), _ = digits_tensors(n_train=256)
    torch.manual_seed(0)
    model = DigitsCNN()
    callback = SVCCACallback(probe=x_probe, layers=LAYERS, reference=("previous", "final"), cross_layer=True)
    trainer = pl.Trainer(
        default_root_dir=root,
        max_epochs=4,
        logger=TensorBoardLogger(root, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(TensorDataset(x_train, y_train), batch_size=64))
    return trainer, model, callback, x_probe


def _pooled_outputs(model, probe):
    """Each layer's output, one datapoint per sample (conv positions averaged), computed here independently."""
    outputs = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in LAYERS
    ]
    model.eval()
    with torch.no_grad():
        model(probe)
    for hook in hooks:
        hook.remove()
    return {name: (o.mean(dim=(2, 3)) if o.ndim == 4 else o).double() for name, o in outputs.items()}


def test_moments_at_the_fractions_of_training(run):
    _, _, callback, _ = run
    maps = callback.monitor.cross_layer_maps
    assert sorted({(r["fraction"], r["epoch"]) for r in maps}) == [(0.0, 0), (0.25, 1), (0.5, 2), (0.75, 3), (1.0, 4)]
    assert len(maps) == 5 * len(LAYERS) ** 2


def test_final_map_against_an_independent_computation(run):
    _, model, callback, probe = run
    pooled = _pooled_outputs(model, probe)
    final = {
        (r["layer"], r["reference_layer"]): r["value"]
        for r in callback.monitor.cross_layer_maps
        if r["fraction"] == 1.0
    }
    for a in LAYERS:
        assert final[(a, a)] == pytest.approx(1.0, abs=1e-6)  # every layer against itself
        for b in LAYERS:
            assert final[(a, b)] == pytest.approx(float(svcca(pooled[a], pooled[b])), abs=2e-5), (a, b)


def test_the_map_sharpens_along_its_diagonal(run):
    _, _, callback, _ = run
    diagonal = {}
    for r in callback.monitor.cross_layer_maps:
        if r["layer"] == r["reference_layer"]:
            diagonal.setdefault(r["fraction"], []).append(r["value"])
    means = [sum(values) / len(values) for _, values in sorted(diagonal.items())]
    assert means == sorted(means) and means[0] < 0.9 < means[-1]


def test_outputs_csv_and_tensorboard_images(run):
    trainer, _, callback, _ = run
    rows = read_history_csv(f"{trainer.log_dir}/svcca_cross_layer.csv")
    assert len(rows) == len(callback.monitor.cross_layer_maps)
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0}).Reload()
    steps = [event.step for event in events.Images("svcca/cross_layer/final")]
    assert steps == sorted({r["step"] for r in callback.monitor.cross_layer_maps})


def test_map_against_a_fixed_reference_model(tmp_path):
    (x_train, y_train), (x_probe, _), _ = digits_tensors(n_train=128)
    torch.manual_seed(0)
    model = DigitsCNN()
    pretrained = copy.deepcopy(model)
    callback = SVCCACallback(
        probe=x_probe,
        layers=LAYERS,
        reference={"pretrained": pretrained},
        cross_layer=(0.0, 1.0),
        cross_layer_reference="pretrained",
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(TensorDataset(x_train, y_train), batch_size=64))
    at_start = {
        (r["layer"], r["reference_layer"]): r["value"]
        for r in callback.monitor.cross_layer_maps
        if r["fraction"] == 0.0
    }
    assert all(at_start[(layer, layer)] == pytest.approx(1.0, abs=1e-6) for layer in LAYERS)  # same weights at 0


def test_bad_cross_layer_arguments():
    with pytest.raises(ValueError, match="fractions of training"):
        SVCCACallback(probe=torch.zeros(4, 1, 8, 8), cross_layer=(0.5, 2.0))
    with pytest.raises(ValueError, match="cross_layer_reference"):
        SVCCACallback(probe=torch.zeros(4, 1, 8, 8), cross_layer=True, cross_layer_reference="pretrained")


def test_kept_moments_survive_a_checkpoint(tmp_path):
    moments = CrossLayerMoments((0.0, 0.5, 1.0), "final", folder=tmp_path)
    layers = {"a": torch.randn(20, 3), "b": torch.randn(20, 5)}
    moments.observe(0, 0, 0, layers, total=10)
    moments.observe(5, 5, 50, layers, total=10)
    restored = CrossLayerMoments((0.0, 0.5, 1.0), "final", folder=tmp_path)
    restored.load_state_dict(moments.state_dict())
    restored.observe(10, 10, 100, layers, total=10)
    maps = restored.maps(["svcca"])
    assert [moment.point for moment, _ in maps] == [0, 5, 10]
    assert all(torch.allclose(layer_map.values.diagonal(), torch.ones(2, dtype=torch.float64)) for _, layer_map in maps)
