"""The examples, run for real in ``--quick`` mode: each script's ``main`` returns its results, checked here."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_svcca.output.reporting import read_history_csv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the folder is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # examples import their shared digits module, as when run as scripts
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_digits_convergence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("digits_convergence")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["accuracy"] > 0.8
    assert result["layers"] == list(example.LAYERS)
    epochs = result["epochs"]
    for layer in example.LAYERS:
        reached = result["convergence"][layer]
        assert set(reached) == set(example.THRESHOLDS)
        for epoch in reached.values():
            assert epoch is not None and 0 <= epoch <= epochs
        assert reached[0.9] <= reached[0.95]
    # The bottom layer settles before the top one (in the full run, every layer before the one above it).
    assert result["convergence"]["relu1"][0.95] < result["convergence"]["relu3"][0.95]

    assert example.TABLE_TITLE in out
    assert all(line in out for line in ("test accuracy", f"tensorboard --logdir {tmp_path}", "history CSV"))
    table = out[out.index(example.TABLE_TITLE) :].splitlines()
    assert [line.split()[0] for line in table[4 : 4 + len(example.LAYERS)]] == list(example.LAYERS)

    rows = read_history_csv(result["csv"])
    assert {row["reference"] for row in rows} >= {"previous", "final", "baseline", "dims"}
    assert any(path.name.startswith("events.out.tfevents") for path in result["log_dir"].iterdir())
    # the cross-layer map sharpens along its diagonal: each layer grows into its final self
    sharpening = result["sharpening"]
    first, last = min(sharpening), max(sharpening)
    assert all(sharpening[first][layer] < sharpening[last][layer] for layer in example.LAYERS)
    assert all(sharpening[last][layer] == pytest.approx(1.0, abs=1e-6) for layer in example.LAYERS)
    assert "Cross-layer SVCCA to the final model" in out


def test_finetune_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("finetune_reference")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["checkpoint"].is_file()
    assert result["pretrain_accuracy"] > 0.8
    assert result["accuracy"] > 0.8
    assert result["layers"] == list(example.LAYERS)
    for reference in ("pretrained", "initial", "previous"):
        values = result[reference]
        assert set(values) == set(example.LAYERS)
        assert all(-1e-9 <= value <= 1 + 1e-9 for value in values.values()), (reference, values)
    # Lower layers stay closer to the pretrained model than upper ones.
    assert result["pretrained"]["relu1"] > result["pretrained"]["relu3"]
    assert result["pretrained"]["relu3"] < 0.95
    # "initial" is the pretrained body with a new head: the same as the checkpoint below the head.
    for layer in ("relu1", "relu2", "relu3"):
        assert result["initial"][layer] == pytest.approx(result["pretrained"][layer], abs=1e-6)

    assert example.TABLE_TITLE in out
    assert "to pretrained" in out
    epochs = {row["epoch"] for row in result["history"] if row["reference"] == "pretrained"}
    assert epochs == set(range(0, 4))
    # the offline comparison of the two models agrees with what the callback measured at the end of fine-tuning
    offline = {row["layer"]: row for row in result["offline"].table}
    for layer in example.LAYERS:
        assert offline[layer]["svcca"] == pytest.approx(result["pretrained"][layer], abs=1e-4)
    assert "offline comparison" in out


def test_sequence_frames(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("sequence_frames")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["accuracy"] > 0.5  # chance is 0.25
    assert result["layers"] == list(example.LAYERS)
    # Padded frames filled with 1e4 change nothing: they never enter the activations.
    assert result["mask_max_difference"] < 1e-6
    assert set(result["final"]) == set(result["poisoned_final"])
    epochs = result["epochs"]
    assert {key for key in result["final"]} == {(layer, e) for layer in example.LAYERS for e in range(epochs + 1)}
    for (layer, _), value in result["final"].items():
        assert 0 <= value <= 1 + 1e-9 and math.isfinite(value)
        if layer == "proj":  # an affine map of the inputs: invisible to SVCCA
            assert value == pytest.approx(1.0, abs=1e-6)

    assert example.TABLE_TITLE in out
    assert "padding ignored" in out


def test_poisoned_padding_differs_only_in_padded_frames() -> None:
    example = load_example("sequence_frames")
    data = example.make_sequences(8, torch.Generator().manual_seed(0))
    poisoned = example.poisoned(data)
    mask = data["mask"]
    assert torch.equal(poisoned["x"][mask], data["x"][mask])
    assert (poisoned["x"][~mask] == example.PAD_POISON).all()
    assert mask.sum(dim=1).min() >= example.MIN_LENGTH and mask.sum(dim=1).max() <= example.MAX_LENGTH


def test_readme_demo_command(tmp_path: Path) -> None:
    """The README's demo, ``python examples/digits_convergence.py``, in its quick form."""
    script = EXAMPLES / "digits_convergence.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert load_example("digits_convergence").TABLE_TITLE in completed.stdout
    assert "tensorboard --logdir runs/digits_convergence" in completed.stdout
    assert list((tmp_path / "runs" / "digits_convergence").rglob("svcca_history.csv"))


def test_freeze_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("freeze_training")
    results = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r.variant for r in results] == ["no freezing", "linear schedule", "convergence"]
    by_name = {r.variant: r for r in results}
    assert by_name["no freezing"].gradient_work_skipped == 0.0 and not by_name["no freezing"].frozen
    # the linear schedule freezes layer i of 3 after i/3 of the 8 epochs; the top monitored layer stays trainable
    assert by_name["linear schedule"].frozen == {"relu1": 3, "relu2": 6}
    assert 0.0 < by_name["linear schedule"].gradient_work_skipped < 1.0
    assert all(r.accuracy > 0.8 for r in results)
    assert "grad work skipped" in out


def test_transfer_resnet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("transfer_resnet")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["pretrain_accuracy"] > 0.8
    assert result["accuracy"] > 0.5  # chance is 0.2
    assert result["layers"] == list(example.STAGES)
    for stage in example.STAGES:
        assert result["noise_floor"][stage] < result["pretrained"][stage] <= 1 + 1e-9
    # the first stage stays closer to the pretrained model than the last one
    assert result["pretrained"]["layer1"] > result["pretrained"]["layer4"]
    epochs = {row["epoch"] for row in result["history"] if row["reference"] == "pretrained"}
    assert epochs == set(range(0, 4))
    assert example.TABLE_TITLE in out
    table = out[out.index(example.TABLE_TITLE) :].splitlines()
    assert [line.split()[0] for line in table[3 : 3 + len(example.STAGES)]] == list(example.STAGES)


def test_speech_pretrain_finetune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    example = load_example("speech_pretrain_finetune")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["layers"] == list(example.LAYERS)
    for column in ("pretrained", "mel_before", "mel_after"):
        values = result[column]
        assert set(values) == set(example.LAYERS), column
        for layer, value in values.items():
            assert result["noise_floor"][layer] < value <= 1 + 1e-9, (column, layer)
    epochs = {row["epoch"] for row in result["history"] if row["reference"] == "log-mel"}
    assert epochs == set(range(0, 4))
    assert not [row for row in result["history"] if row["reference"] == "log-mel" and row["value"] != row["value"]]
    assert example.TABLE_TITLE in out
    table = out[out.index(example.TABLE_TITLE) :].splitlines()
    assert [line.split()[0] for line in table[3 : 3 + len(example.LAYERS)]] == [
        example.short(layer) for layer in example.LAYERS
    ]


def test_speech_features_line_up_with_encoder_frames() -> None:
    pytest.importorskip("transformers")
    example = load_example("speech_pretrain_finetune")
    audio, mask, labels = example.clips("shape", 6, torch.Generator().manual_seed(0)).tensors
    lengths = mask.sum(dim=1)
    assert bool((lengths % example.HOP == 0).all()) and set(labels.tolist()) <= {0, 1, 2}
    model = example.SpeechClassifier(num_labels=3).model
    frames = model.wav2vec2._get_feat_extract_output_lengths(lengths)
    torch.testing.assert_close(frames, lengths // example.HOP)  # one log-mel frame per encoder frame
    mel = example.log_mel(audio)
    assert mel.shape == (6, example.MAX_FRAMES, example.MELS)
    # a pure tone's energy sits in the band holding its frequency
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(example.HOP * 4) / example.SAMPLE_RATE)[None, :]
    peak = int(example.log_mel(tone)[0, 0].argmax())
    assert 1000 * 0.7 < float(mel_band_centres(example)[peak]) < 1000 * 1.3


def mel_band_centres(example: ModuleType) -> torch.Tensor:
    top = 2595 * math.log10(1 + example.SAMPLE_RATE / 2 / 700)
    centres = torch.linspace(0, top, example.MELS + 2)[1:-1]
    return 700 * (10 ** (centres / 2595) - 1)


def test_plain_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("plain_loop")
    result = example.main(["--quick", "--freeze", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["accuracy"] > 0.8
    assert "test accuracy" in out and "frozen at" in out
    # the monitor wrote what the callback writes: TensorBoard events and the history CSV, in the loop's folder
    assert read_history_csv(tmp_path / "svcca_history.csv") == result["history"]
    assert any(path.name.startswith("events.out.tfevents") for path in tmp_path.iterdir())
    previous = [row for row in result["history"] if row["reference"] == "previous"]
    assert {row["epoch"] for row in previous} == set(range(1, 7))
    # every frozen layer's curve is flat from its freeze on: its weights no longer change
    for layer, epoch in result["frozen"].items():
        later = [row["value"] for row in previous if row["layer"] == layer and row["epoch"] > epoch]
        assert all(value == pytest.approx(1.0, abs=1e-6) for value in later), layer


def test_hf_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    example = load_example("hf_trainer")
    result = example.main(["--quick", "--root", str(tmp_path)])
    out = capsys.readouterr().out

    assert result["accuracy"] > 0.8
    assert "SVCCA to the final model" in out
    final = [row for row in result["history"] if row["reference"] == "final"]
    assert {row["epoch"] for row in final} == {0, 1, 2, 3}
    assert read_history_csv(tmp_path / "svcca_history.csv") == result["history"]
    assert any((tmp_path / "runs" / "svcca").glob("events.out.tfevents*"))
