"""compare_models and cross_layer_similarity on a real digits CNN, against svcca computed pair by pair."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_svcca.cli.main import main
from lightning_svcca.measures import cca, linear_cka, procrustes, svcca
from lightning_svcca.measures._checks import TooFewDatapointsWarning
from lightning_svcca.offline.compare import compare_models
from lightning_svcca.pipeline.crosslayer import LayerMap, cross_layer_similarity, pool_by_sample
from lightning_svcca.pipeline.metrics import snapshot_needs
from lightning_svcca.pipeline.snapshot import LocalCollective, build_snapshot

pytestmark = pytest.mark.filterwarnings("ignore::lightning_svcca.measures.TooFewDatapointsWarning")

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
# Snapshots store float32 bases: values agree with float64 pair-by-pair ones to a few float32 ulps * sqrt(rows).
STORAGE_TOL = 1e-4


@pytest.fixture(scope="module")
def two_models(digits_cnn, digits):
    """A TinyDigitsCNN and a copy fine-tuned for a few SGD steps on digits."""
    torch.manual_seed(0)
    images, labels = digits
    before = digits_cnn()
    after = copy.deepcopy(before)
    optimizer = torch.optim.SGD(after.parameters(), lr=0.1)
    for step in range(6):
        batch = slice(64 * step, 64 * (step + 1))
        loss = nn.functional.cross_entropy(after(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before.eval(), after.eval(), images[1000:1400]


def _hooked(model, probe, layers):
    """The layers' float32 outputs on the probe, conv outputs averaged over positions (without the package)."""
    outputs = {}
    handles = [
        dict(model.named_modules())[name].register_forward_hook(
            lambda module, args, output, name=name: outputs.__setitem__(name, output.detach())
        )
        for name in layers
    ]
    with torch.no_grad():
        model(probe)
    for handle in handles:
        handle.remove()
    return {name: out.mean(dim=(2, 3)) if out.ndim == 4 else out for name, out in outputs.items()}


def test_compare_models_matches_pair_by_pair(two_models):
    before, after, probe = two_models
    result = compare_models(before, after, probe, LAYERS, ("svcca", "cca", "linear_cka"), reduction="mean")
    a, b = _hooked(before, probe, LAYERS), _hooked(after, probe, LAYERS)
    assert [row["layer"] for row in result.table] == LAYERS
    for row in result.table:
        x, y = a[row["layer"]], b[row["layer"]]
        assert row["svcca"] == pytest.approx(float(svcca(x, y)), abs=STORAGE_TOL)
        assert row["cca"] == pytest.approx(float(cca(x, y).mean()), abs=STORAGE_TOL)
        assert row["linear_cka"] == pytest.approx(float(linear_cka(x, y)), abs=STORAGE_TOL)
    # the cross-layer map: every layer of A against every layer of B
    assert result.cross_layer.rows == result.cross_layer.columns == LAYERS
    for i, p in enumerate(LAYERS):
        for j, q in enumerate(LAYERS):
            expected = float(svcca(a[p], b[q]))
            assert float(result.cross_layer.values[i, j]) == pytest.approx(expected, abs=STORAGE_TOL)
    text = result.to_text()
    assert "conv2" in text and "cross-layer svcca" in text
    # training moved the model: the top layers changed more than the first conv
    table = {row["layer"]: row["svcca"] for row in result.table}
    assert table["conv1"] > table["fc2"]


def test_compare_models_with_positions_pools_for_the_cross_layer_map(two_models):
    before, after, probe = two_models
    result = compare_models(before, after, probe[:100], LAYERS, ("svcca",), max_datapoints=1600)
    # the diagonal of the per-sample map is a different datapoint set than the positions table, but both are high
    # for the same model compared with itself; the map's values follow pair-by-pair svcca of pooled activations
    a, b = _hooked(before, probe[:100], LAYERS), _hooked(after, probe[:100], LAYERS)
    for i, p in enumerate(LAYERS):
        for j, q in enumerate(LAYERS):
            assert float(result.cross_layer.values[i, j]) == pytest.approx(float(svcca(a[p], b[q])), abs=STORAGE_TOL)


def test_identical_models_give_one_on_the_diagonal(two_models):
    before, _, probe = two_models
    result = compare_models(before, before, probe, LAYERS, ("svcca", "procrustes"))
    for row in result.table:
        assert row["svcca"] == pytest.approx(1.0, abs=STORAGE_TOL)
        assert row["procrustes"] == pytest.approx(1.0, abs=STORAGE_TOL)
    torch.testing.assert_close(result.cross_layer.values, result.cross_layer.values.T, atol=STORAGE_TOL, rtol=0)


def test_cross_layer_similarity_with_widths_spatial_sizes_and_sample_ids():
    generator = torch.Generator().manual_seed(0)
    n = 300
    latent = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    conv = latent[:, :, None, None] + 0.1 * torch.randn(n, 4, 5, 5, generator=generator, dtype=torch.float64)
    dense = latent @ torch.randn(4, 9, generator=generator, dtype=torch.float64)
    positions = conv.permute(0, 2, 3, 1).reshape(-1, 4)  # 25 rows per sample
    ids = torch.arange(n).repeat_interleave(25)
    result = cross_layer_similarity(
        {"conv": conv, "dense": dense},
        {"positions": positions, "dense": dense},
        "procrustes",
        sample_ids_b={"positions": ids},
    )
    assert isinstance(result, LayerMap) and result.values.shape == (2, 2)
    pooled_conv = conv.mean(dim=(2, 3))
    expected = [
        [procrustes(pooled_conv, pooled_conv), procrustes(pooled_conv, dense)],
        [procrustes(dense, pooled_conv), procrustes(dense, dense)],
    ]
    torch.testing.assert_close(
        result.values, torch.tensor([[float(v) for v in r] for r in expected], dtype=torch.float64)
    )
    torch.testing.assert_close(pool_by_sample(positions, ids), pooled_conv)


def test_cross_layer_similarity_from_snapshots_and_errors():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 6, generator=generator), torch.randn(200, 9, generator=generator)
    full_rank, with_right, _ = snapshot_needs(["cca"])

    def snap(rows):
        return build_snapshot(
            rows,
            LocalCollective(),
            name="l",
            keep=0.99,
            keep_by="singular_values",
            full_rank=full_rank,
            with_right=with_right,
            input_eps=torch.finfo(torch.float32).eps,
        )

    result = cross_layer_similarity({"x": snap(x), "y": snap(y)}, {"y": snap(y)}, "cca")
    assert float(result.values[0, 0]) == pytest.approx(float(cca(x.double(), y.double()).mean()), abs=STORAGE_TOL)
    assert float(result.values[1, 0]) == pytest.approx(1.0, abs=STORAGE_TOL)
    with pytest.raises(ValueError, match="metric must be one of"):
        cross_layer_similarity({"x": x}, {"y": y}, "kendall")
    with pytest.raises(TypeError, match="not a mix"):
        cross_layer_similarity({"x": snap(x)}, {"y": y})
    with pytest.raises(ValueError, match="different numbers of datapoints.*sample_ids_a"):
        cross_layer_similarity({"x": x}, {"y": y[:100]})
    with pytest.raises(ValueError, match="pooled to one datapoint per sample"):
        cross_layer_similarity({"x": snap(x)}, {"y": snap(y[:100])})


@pytest.mark.filterwarnings("ignore:You defined a `validation_step`")
def test_cli_compare_two_checkpoints(tmp_path, digits_cnn, digits_loaders, capsys):
    train, _ = digits_loaders
    model = digits_cnn()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    trainer.strategy.connect(model)
    first = tmp_path / "first.ckpt"
    trainer.save_checkpoint(first)
    trainer.fit(model, train)
    second = tmp_path / "second.ckpt"
    trainer.save_checkpoint(second)
    cls = f"{digits_cnn.__module__}:{digits_cnn.__name__}"
    argv = ["compare", str(first), str(second), "--model", cls, "--probe", "digits", "--probe-size", "300"]
    assert main([*argv, "--metrics", "svcca", "linear_cka"]) == 0
    out = capsys.readouterr().out
    for text in ("layer", "svcca", "linear_cka", "conv1", "fc2", "cross-layer svcca"):
        assert text in out
    # a probe tensor file and a dotted class path
    torch.save(digits_loaders[1].dataset.tensors[0], tmp_path / "probe.pt")
    dotted = f"{digits_cnn.__module__}.{digits_cnn.__name__}"
    assert main(["compare", str(first), str(first), "--model", dotted, "--probe", str(tmp_path / "probe.pt")]) == 0
    assert "1.000" in capsys.readouterr().out
    assert main(["compare", str(first), str(second), "--model", "nowhere", "--probe", "digits"]) == 2
    assert "--model must be" in capsys.readouterr().err


def test_compare_models_refuses_a_keep_out_of_range_as_svcca_does(two_models):
    before, after, probe = two_models
    with pytest.raises(ValueError, match=r"keep as a fraction must be in \(0, 1\], got 1.5"):
        compare_models(before, after, probe, LAYERS, ("svcca",), keep=1.5)


def test_compare_models_warns_when_the_probe_is_too_small_for_the_directions_kept(two_models):
    """Five samples gave 1.000 for every layer of two different models, with no word: CCA on fewer datapoints than
    directions is biased towards 1."""
    before, after, probe = two_models
    with pytest.warns(TooFewDatapointsWarning, match=r"layer 'fc1' compares \d+ directions using only 5 datapoints"):
        compare_models(before, after, probe[:5], ["fc1"], ("svcca",))
