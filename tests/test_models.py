"""The probe and the recorder on the models this project's users train: Hugging Face BERT and wav2vec2 / HuBERT
built from tiny configs (random init, no download), a ResNet with BasicBlock stages, class-sorted datasets."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca.pipeline.layers import default_layers, format_layers, resolve_layers
from lightning_svcca.pipeline.probe import batch_size, build_probe, probe_indices, run_probe
from lightning_svcca.pipeline.recording import ActivationRecorder

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
#: a wav2vec2 feature encoder of three strided convolutions (total stride 20) with per-frame LayerNorm, the
#: "layer" variant (wav2vec2-large-lv60, HuBERT large) that is meant to be called with an attention_mask
SPEECH = {
    **TINY,
    "conv_dim": (16, 16, 16),
    "conv_stride": (5, 2, 2),
    "conv_kernel": (10, 3, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
}


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, num_labels=3, **TINY)
    return transformers.BertForSequenceClassification(config).eval()


def _wav2vec2(**changes) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(num_labels=3, **{**SPEECH, **changes})
    return transformers.Wav2Vec2ForSequenceClassification(config).eval()


def _wav2vec2_post_norm() -> nn.Module:
    """Post-norm transformer layers (wav2vec2-base's encoder) over the same feature encoder."""
    return _wav2vec2(do_stable_layer_norm=False)


def _hubert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.HubertModel(transformers.HubertConfig(**SPEECH)).eval()


class _BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_BasicBlock(8, 8, 1), _BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(_BasicBlock(8, 16, 2), _BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(out.mean(dim=(2, 3)))


def _record(model: nn.Module, batch: dict, chunk: int = 3, layers=None) -> ActivationRecorder:
    """What the callback does at a measurement: default layers, the probe's mask, chunks of ``chunk`` samples."""
    probe = build_probe(batch, None)
    mask = probe.batch[probe.mask_key] if probe.mask_key is not None else None
    recorder = ActivationRecorder(
        model,
        resolve_layers(model, layers, "positions"),
        per_sample=10_000,
        mask_frames=None if mask is None else int(mask.shape[1]),
    )

    def before_chunk(first: int, part: dict) -> None:
        recorder.start_chunk(first, probe.lengths(part), batch_size(part), CPU)

    with recorder:
        run_probe(model, probe, chunk_size=chunk, device=CPU, before_chunk=before_chunk)
    return recorder


def _padded(lengths: list[int], frames: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).long()
    return mask, torch.randn(len(lengths), frames, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Default layers
# ----------------------------------------------------------------------------------------------------------------


def test_bert_default_layers_are_its_blocks_stem_and_heads():
    names = default_layers(_bert())
    assert names == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.pooler",
        "classifier",
    ]
    assert format_layers(names) == "5 layers: bert.embeddings, bert.encoder.layer.{0..1}, bert.pooler, classifier"
    bare = transformers.BertModel(transformers.BertConfig(vocab_size=100, **TINY))
    assert default_layers(bare) == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]


@pytest.mark.parametrize("make", [_wav2vec2, _hubert], ids=["wav2vec2", "hubert"])
def test_speech_default_layers_are_conv_and_transformer_blocks(make):
    model = make()
    prefix = "wav2vec2." if hasattr(model, "wav2vec2") else ""
    names = default_layers(model)
    blocks = [f"{prefix}feature_extractor.conv_layers.{i}" for i in range(3)]
    blocks += [f"{prefix}encoder.layers.{i}" for i in range(2)]
    assert [name for name in names if name in blocks] == blocks
    assert f"{prefix}feature_projection" in names
    # nothing inside a block, no lone LayerNorm
    assert not any(name.startswith(block + ".") for name in names for block in blocks)
    assert f"{prefix}encoder.layer_norm" not in names
    if prefix:
        assert names[-2:] == ["projector", "classifier"]


def test_speech_group_norm_feature_encoder_is_still_one_block_list():
    """wav2vec2-base's first conv layer (with GroupNorm) has another type than the rest: still one stage."""
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**{**SPEECH, "feat_extract_norm": "group"}))
    names = default_layers(model)
    assert [name for name in names if "conv_layers" in name] == [f"feature_extractor.conv_layers.{i}" for i in range(3)]


class _TorchvisionLikeResNet(_ResNet):
    """torchvision's layout: the stem's ReLU and max pooling are modules of their own."""

    def __init__(self) -> None:
        super().__init__()
        layer1, layer2, fc = self.layer1, self.layer2, self.fc
        del self.layer1, self.layer2, self.fc  # registered again below, in torchvision's order
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.fc = layer1, layer2, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(out.mean(dim=(2, 3)))


def test_resnet_default_stem_is_its_first_nonlinearity_not_conv1():
    """conv1 (and conv1 + BatchNorm) is a linear map of the image: 1.000 to every reference at every epoch. The
    stem is the ReLU after it where that is a module; with ``torch.relu`` there is none and the stem is left out."""
    assert default_layers(_TorchvisionLikeResNet()) == ["relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    assert default_layers(_ResNet()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]


def _vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, num_labels=3, **TINY, hidden_dropout_prob=0.0
    )
    return transformers.ViTForImageClassification(config).eval()


def test_vit_default_layers_leave_out_the_patch_embedding():
    """The patch embedding (a convolution plus constant tokens and positions) reads 1.000 to every reference; the
    blocks and the head are monitored, and they run on a probe of images."""
    model = _vit()
    names = default_layers(model)
    assert not any("embeddings" in name for name in names)
    blocks = [name for name in names if name != "classifier"]
    assert len(blocks) == TINY["num_hidden_layers"] and names[-1] == "classifier"
    recorder = _record(model, {"pixel_values": torch.randn(4, 3, 16, 16)}, chunk=2)
    assert set(recorder.activations) == set(names)


def test_models_without_repeated_blocks_keep_every_layer():
    from digits_models import TinyDigitsCNN

    assert default_layers(TinyDigitsCNN()) == ["conv1", "conv2", "fc1", "fc2"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert default_layers(mlp) == ["0", "2", "4"]


# ----------------------------------------------------------------------------------------------------------------
# Dict batches and padding
# ----------------------------------------------------------------------------------------------------------------


def test_bert_padding_is_left_out_of_every_layer():
    generator = torch.Generator().manual_seed(0)
    lengths = [20, 15, 7, 20, 3]
    mask = (torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(1, 100, (5, 20), generator=generator)
    other_pads = torch.where(mask.bool(), ids, torch.randint(1, 100, (5, 20), generator=generator))
    labels = torch.zeros(5, dtype=torch.long)  # a key the model takes too: model(**batch) passes it
    first = _record(_bert(), {"input_ids": ids, "attention_mask": mask, "labels": labels})
    second = _record(_bert(), {"input_ids": other_pads, "attention_mask": mask, "labels": labels})

    assert set(first.activations) == set(default_layers(_bert()))
    for layer, rows in first.activations.items():
        expected = sum(lengths) if layer.startswith(("bert.embeddings", "bert.encoder")) else len(lengths)
        assert rows.shape[0] == expected, layer
        torch.testing.assert_close(rows, second.activations[layer], rtol=0, atol=0)
    # without the mask, the padded positions are datapoints too, and they differ
    unmasked = build_probe({"input_ids": ids, "attention_mask": mask}, None, mask_key=False)
    assert unmasked.mask_key is None


def _conv_lengths(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Valid frames after each conv layer of SPEECH: floor((L - kernel) / stride) + 1, written out."""
    out = []
    for kernel, stride in zip(SPEECH["conv_kernel"], SPEECH["conv_stride"], strict=True):
        lengths = (lengths - kernel) // stride + 1
        out.append(lengths)
    return out


@pytest.mark.parametrize("make", [_wav2vec2, _wav2vec2_post_norm, _hubert], ids=["wav2vec2", "post-norm", "hubert"])
def test_speech_padding_is_left_out_of_every_layer(make):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1600, 1210, 905, 1600, 700])
    mask, audio = _padded(lengths.tolist(), 1600, generator)
    other_pads = torch.where(mask.bool(), audio, 5 * torch.randn(audio.shape, generator=generator))
    first = _record(make(), {"input_values": audio * mask, "attention_mask": mask})
    second = _record(make(), {"input_values": other_pads, "attention_mask": mask})

    frames = _conv_lengths(lengths)
    for layer, rows in first.activations.items():
        if ".conv_layers." in layer:
            expected = int(frames[int(layer[-1])].sum())
            assert first.layouts[layer] == "channels_first" and rows.shape[1] == 16  # (N, C, T): time = datapoints
        elif layer == "classifier":
            expected = len(lengths)
        else:
            expected = int(frames[-1].sum())
        assert rows.shape[0] == expected, layer
        torch.testing.assert_close(rows, second.activations[layer], rtol=0, atol=0)


def test_frame_lengths_use_the_models_length_hook():
    model = _wav2vec2()
    lengths = torch.tensor([1600, 1210, 905])
    recorder = ActivationRecorder(model, [], per_sample=1, mask_frames=1600)
    assert recorder.output_lengths is not None  # found on the wav2vec2 submodule
    torch.testing.assert_close(recorder.frame_lengths(lengths, 79), _conv_lengths(lengths)[-1])
    torch.testing.assert_close(recorder.frame_lengths(lengths, 1600), lengths)


def test_bert_left_padding_fails_clearly():
    ids = torch.randint(1, 100, (2, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded.*padding_side='right'"):
        build_probe({"input_ids": ids, "attention_mask": left}, None)


def test_the_attention_mask_can_be_switched_off():
    probe = build_probe({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)}, None, mask_key=False)
    assert probe.mask_key is None and probe.input_key is None


# ----------------------------------------------------------------------------------------------------------------
# Probe selection
# ----------------------------------------------------------------------------------------------------------------


def test_a_probe_from_a_class_sorted_dataset_covers_every_class():
    x, y = load_digits(return_X_y=True)
    order = torch.from_numpy(y).argsort(stable=True)
    images = torch.tensor(x, dtype=torch.float32)[order]
    labels = torch.from_numpy(y)[order]
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    assert set(labels[:100].tolist()) <= {0}  # what dataset[0:100] would have been

    probe = build_probe(loader, 100)
    counts = torch.bincount(probe.batch[1], minlength=10)
    assert probe.size == 100 and bool((counts > 0).all()), counts
    # the same subset whenever it is built (every rank, every resume): a function of the seed and the length
    again = build_probe(DataLoader(TensorDataset(images, labels), batch_size=7), 100)
    assert again.fingerprint() == probe.fingerprint()
    assert torch.equal(probe.batch[1], labels[probe_indices(len(labels), 100, seed=0)])
    assert build_probe(loader, 100, seed=1).fingerprint() != probe.fingerprint()


def test_a_conv_wrapper_that_hides_its_conv_is_read_channels_first():
    """Hugging Face's conv layers: Conv1d -> LayerNorm over channels -> activation, returning (N, C, T)."""

    class ConvLayer(nn.Module):
        def __init__(self, inputs: int) -> None:
            super().__init__()
            self.conv = nn.Conv1d(inputs, 8, 3, stride=2)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return torch.relu(self.norm(x.transpose(1, 2)).transpose(1, 2))

    model = nn.Sequential(ConvLayer(4), ConvLayer(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorder = _record(model, {"input": torch.randn(3, 4, 41)}, layers=["0", "1"])
    assert recorder.layouts == {"0": "channels_first", "1": "channels_first"}
    assert recorder.activations["0"].shape == (3 * 20, 8) and recorder.activations["1"].shape == (3 * 9, 8)


# ----------------------------------------------------------------------------------------------------------------
# End to end: SVCCACallback() with nothing but defaults on a BERT and a wav2vec2 LightningModule
# ----------------------------------------------------------------------------------------------------------------


class _HFModule(pl.LightningModule):
    """A Hugging Face classifier trained on dict batches: ``forward(**inputs)`` returns logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, attention_mask: torch.Tensor, input_ids=None, input_values=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids} if input_ids is not None else {"input_values": input_values}
        return self.model(**inputs, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        return nn.functional.cross_entropy(self(**batch), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.columns.items()}


def _text_data(count: int, generator: torch.Generator) -> _Dicts:
    lengths = torch.randint(3, 17, (count,), generator=generator)
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (count, 16), generator=generator) * mask
    return _Dicts(input_ids=ids, attention_mask=mask, labels=torch.randint(3, (count,), generator=generator))


def _audio_data(count: int, generator: torch.Generator) -> _Dicts:
    lengths = torch.randint(600, 1601, (count,), generator=generator)
    mask, audio = _padded(lengths.tolist(), 1600, generator)
    return _Dicts(
        input_values=audio * mask, attention_mask=mask, labels=torch.randint(3, (count,), generator=generator)
    )


@pytest.mark.filterwarnings("ignore:.*SVCCA keeps")  # a probe of 32 sentences is small for the pooler
@pytest.mark.parametrize(("make", "data"), [(_bert, _text_data), (_wav2vec2, _audio_data)], ids=["bert", "wav2vec2"])
def test_the_callback_with_defaults_on_hugging_face_models(make_trainer, make, data):
    from lightning_svcca import SVCCACallback

    generator = torch.Generator().manual_seed(0)
    model = _HFModule(make().train())
    loader = DataLoader(data(48, generator), batch_size=16, shuffle=True)
    callback = SVCCACallback(probe_size=32)  # probe: a seeded subset of the training set; model(**batch)
    make_trainer([callback], max_epochs=1, logger=False).fit(model, loader)

    expected = [f"model.{name}" for name in default_layers(model.model)]
    # a probe of 32 sentences gives the pooler (one datapoint per sentence) fewer than 2 per kept direction
    expected = [name for name in expected if name != "model.bert.pooler"]
    assert sorted(callback.layers) == sorted(expected)
    assert callback.monitor.probe.mask_key == "attention_mask" and callback.monitor.probe.input_key is None
    measured = {row["layer"] for row in callback.history if row["reference"] == "previous"}
    assert measured == set(expected)
    dims = {row["layer"]: row["value"] for row in callback.history if row["reference"] == "dims"}
    assert all(value <= 32 for layer, value in dims.items() if "classifier" not in layer)  # at most the channels
