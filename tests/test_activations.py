"""Tests of the activations stage (pipeline.layers, recording, reduction): layer names, forward hooks, output
selection and reductions."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from lightning_svcca.pipeline.layers import LayerSpec, default_layers, format_layers, resolve_layers
from lightning_svcca.pipeline.recording import ActivationRecorder, LayoutWarning
from lightning_svcca.pipeline.reduction import reduce_output

CPU = torch.device("cpu")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Zoo(nn.Module):
    """Every default layer type, some nested, declared in an order different from the forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)  # declared first, runs last
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.conv = nn.Conv1d(8, 8, 1)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        out = self.block(self.encoder(out))
        out = self.conv(out.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(out).mean(dim=1))


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.relu1(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _record(model: nn.Module, specs: list[LayerSpec], x: torch.Tensor, *, per_sample: int = 1000, chunk: int = 0):
    recorder = ActivationRecorder(model, specs, per_sample=per_sample)
    chunk = chunk or x.shape[0]
    with recorder, torch.no_grad():
        for first in range(0, x.shape[0], chunk):
            part = x[first : first + chunk]
            recorder.start_chunk(first, None, part.shape[0], CPU)
            model(part)
    return recorder


# ----------------------------------------------------------------------------------------------------------------
# Layer names
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("conv_1", "conv1"), ("Conv2", "conv2"), ("relu", "relu1"), ("fcc", "fc")],
)
def test_unknown_layer_suggests_close_matches(name, suggestion):
    with pytest.raises(ValueError, match=rf"{name!r}.*did you mean.*{suggestion!r}"):
        resolve_layers(_ConvNet(), [name], "positions")


def test_unknown_layer_without_close_match_points_to_named_modules():
    with pytest.raises(ValueError, match=r"'zzzzzz'.*named_modules"):
        resolve_layers(_ConvNet(), ["zzzzzz"], "positions")


def test_root_module_name_is_rejected():
    with pytest.raises(ValueError, match="not a module"):
        resolve_layers(_ConvNet(), [""], "positions")


def test_duplicate_layer_names_raise():
    with pytest.raises(ValueError, match=r"twice.*\['conv1', 'fc', 'conv1'\]"):
        resolve_layers(_ConvNet(), ["conv1", "fc", "conv1"], "positions")


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([], "empty"),
        ({"conv1": {"colour": "red"}}, r"unknown options \['colour'\]"),
        ({"conv1": {"reduction": "max"}}, "reduction of layer 'conv1' must be one of"),
        ({"conv1": {"layout": "sideways"}}, "layout of layer 'conv1' must be one of"),
    ],
)
def test_bad_layer_arguments_raise(layers, match):
    with pytest.raises(ValueError, match=match):
        resolve_layers(_ConvNet(), layers, "positions")


def test_resolve_layers_with_options_and_default_reduction():
    specs = resolve_layers(_ConvNet(), {"conv1": {"reduction": "mean"}, "fc": {}}, "flatten")
    assert specs == [LayerSpec("conv1", reduction="mean"), LayerSpec("fc", reduction="flatten")]
    assert resolve_layers(_ConvNet(), "fc", "positions") == [LayerSpec("fc")]


def test_default_layers_are_outermost_first():
    names = default_layers(_Zoo())
    assert names == ["head", "gru", "encoder", "block.0", "conv"]
    # The projections inside the Transformer layer (self_attn.out_proj, linear1, linear2) are Linear too.
    assert not any(name.startswith("encoder.") for name in names)
    assert [spec.name for spec in resolve_layers(_Zoo(), None, "mean")] == names


def test_default_layers_of_a_model_without_any_raises():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    assert default_layers(model) == []
    with pytest.raises(ValueError, match="found no Linear"):
        resolve_layers(model, None, "positions")


# ----------------------------------------------------------------------------------------------------------------
# ActivationRecorder
# ----------------------------------------------------------------------------------------------------------------


def _no_hooks(model: nn.Module) -> bool:
    return all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_hooks_are_removed_after_the_block():
    model = _Zoo()
    recorder = ActivationRecorder(model, [LayerSpec("gru"), LayerSpec("head")], per_sample=4)
    with recorder:
        assert not _no_hooks(model)
    assert _no_hooks(model)


def test_hooks_are_removed_after_an_error():
    model = _Zoo()
    with pytest.raises(RuntimeError), ActivationRecorder(model, [LayerSpec("conv")], per_sample=4) as recorder:
        recorder.start_chunk(0, None, 2, CPU)
        model(torch.randn(2, 5, 3))  # wrong width
    assert _no_hooks(model)


def test_recording_without_start_chunk_raises():
    model = _ConvNet()
    with pytest.raises(RuntimeError, match="start_chunk"), ActivationRecorder(model, [LayerSpec("fc")], per_sample=4):
        model(torch.randn(2, 1, 4, 4))


def test_records_layers_bottom_up_whatever_order_they_are_named_in():
    model = _Zoo()
    specs = [LayerSpec(name) for name in ("head", "conv", "block.1", "gru", "encoder")]
    recorder = _record(model, specs, torch.randn(3, 5, 4))
    assert recorder.order == ["gru", "encoder", "block.1", "conv", "head"]
    assert set(recorder.activations) == {spec.name for spec in specs}


def test_recorded_rows_match_the_module_outputs():
    torch.manual_seed(0)
    model = _ConvNet()
    x = torch.randn(5, 1, 4, 4)
    recorder = _record(model, [LayerSpec("conv1"), LayerSpec("relu1"), LayerSpec("fc")], x)
    with torch.no_grad():
        conv1 = model.conv1(x)
        logits = model(x)
    # conv outputs: one datapoint per position, sample-major; a ReLU after a conv inherits its layout.
    torch.testing.assert_close(recorder.activations["conv1"], conv1.permute(0, 2, 3, 1).reshape(-1, 4))
    torch.testing.assert_close(recorder.activations["relu1"], conv1.relu().permute(0, 2, 3, 1).reshape(-1, 4))
    torch.testing.assert_close(recorder.activations["fc"], logits)
    assert recorder.sample_ids["conv1"].tolist() == [i for i in range(5) for _ in range(16)]
    assert recorder.sample_ids["fc"].tolist() == list(range(5))
    assert recorder.layouts["relu1"] == "channels_first"


def test_gru_tuple_output_defaults_to_the_sequence():
    torch.manual_seed(0)
    model = _Zoo()
    x = torch.randn(3, 5, 4)
    recorder = _record(model, [LayerSpec("gru")], x)
    with torch.no_grad():
        out, _ = model.gru(x)
    torch.testing.assert_close(recorder.activations["gru"], out.reshape(15, 8))
    assert recorder.sample_ids["gru"].tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_gru_final_state_by_index_with_its_layout():
    torch.manual_seed(0)
    model = _Zoo()
    x = torch.randn(3, 5, 4)
    # h_n is (num_layers, N, H) even with batch_first=True: its layout is time-first.
    recorder = _record(model, [LayerSpec("gru", output=1, layout="time_first")], x)
    with torch.no_grad():
        _, h = model.gru(x)
    torch.testing.assert_close(recorder.activations["gru"], h[0])
    assert recorder.sample_ids["gru"].tolist() == [0, 1, 2]


def test_output_not_aligned_with_the_samples_raises():
    model = _Zoo()
    with pytest.raises(ValueError, match="gru"):
        _record(model, [LayerSpec("gru", output=1)], torch.randn(3, 5, 4))


def test_reduce_output_rejects_a_batch_size_mismatch():
    with pytest.raises(ValueError):
        reduce_output(
            torch.randn(2, 5, 4),
            layout="channels_last",
            reduction="positions",
            sample_ids=torch.arange(5),
            per_sample=100,
            seed=0,
        )


@dataclasses.dataclass
class _ModelOutput:
    logits: torch.Tensor
    last_hidden_state: torch.Tensor
    extra: str = "x"


class _DictModule(nn.Module):
    def forward(self, x):
        return {"aux": x * 2, "logits": x * 3, "name": "dict"}


class _DataclassModule(nn.Module):
    def forward(self, x):
        return _ModelOutput(logits=x * 5, last_hidden_state=x * 7)


class _TupleModule(nn.Module):
    def forward(self, x):
        return (x * 11, x * 13, None)


class _MultiOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.as_dict = _DictModule()
        self.as_dataclass = _DataclassModule()
        self.as_tuple = _TupleModule()

    def forward(self, x):
        return self.as_dict(x), self.as_dataclass(x), self.as_tuple(x)


@pytest.mark.parametrize(
    ("layer", "output", "factor"),
    [
        ("as_dict", None, 3),  # "logits" is a known hidden-state name
        ("as_dict", "aux", 2),
        ("as_dataclass", None, 7),  # last_hidden_state first
        ("as_dataclass", "logits", 5),
        ("as_tuple", None, 11),
        ("as_tuple", 1, 13),
        ("as_tuple", -3, 11),
    ],
)
def test_output_selection(layer, output, factor):
    x = torch.randn(4, 3)
    recorder = _record(_MultiOutput(), [LayerSpec(layer, output=output)], x)
    torch.testing.assert_close(recorder.activations[layer], x * factor)


@pytest.mark.parametrize(
    ("layer", "output", "error", "match"),
    [
        ("as_dict", "hidden", ValueError, r"output='hidden'.*available: \['aux', 'logits', 'name'\]"),
        ("as_dict", "name", TypeError, "selects a str, not a tensor"),
        ("as_dataclass", "pooler", ValueError, r"output='pooler'.*available: \['logits', 'last_hidden_state'"),
        ("as_tuple", 5, ValueError, r"output=5.*available: 3"),
        ("as_tuple", 2, TypeError, "selects a NoneType"),
    ],
)
def test_bad_output_selection_raises_clearly(layer, output, error, match):
    with pytest.raises(error, match=match):
        _record(_MultiOutput(), [LayerSpec(layer, output=output)], torch.randn(4, 3))


def test_output_without_a_tensor_raises():
    class Texts(nn.Module):
        def forward(self, x):
            return {"text": "hello"}

    with pytest.raises(TypeError, match="without a tensor"):
        _record(nn.Sequential(Texts()), [LayerSpec("0")], torch.randn(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# reduce_output
# ----------------------------------------------------------------------------------------------------------------


def _reduce(output, sample_ids=None, **kwargs):
    arguments = dict(layout="channels_first", reduction="positions", per_sample=1000, seed=7)
    arguments.update(kwargs)
    sample_ids = torch.arange(output.shape[0]) if sample_ids is None else sample_ids
    return reduce_output(output, sample_ids=sample_ids, **arguments)


@pytest.fixture
def conv_output() -> torch.Tensor:
    return torch.randn(10, 3, 4, 5, generator=_generator())  # (N, C, H, W): 20 positions


@pytest.mark.parametrize("per_sample", [20, 21, 1000])
def test_conv_positions_all_kept_under_the_cap(conv_output, per_sample):
    rows, ids = _reduce(conv_output, per_sample=per_sample)
    assert rows.shape == (10 * 20, 3)
    torch.testing.assert_close(rows, conv_output.permute(0, 2, 3, 1).reshape(-1, 3), rtol=0, atol=0)
    assert ids.tolist() == [i for i in range(10) for _ in range(20)]


@pytest.mark.parametrize("per_sample", [1, 3, 19])
def test_conv_positions_capped_per_sample(conv_output, per_sample):
    rows, ids = _reduce(conv_output, per_sample=per_sample)
    assert rows.shape == (10 * per_sample, 3)
    assert ids.tolist() == [i for i in range(10) for _ in range(per_sample)]
    positions = conv_output.permute(0, 2, 3, 1).reshape(10, 20, 3)
    for sample in range(10):
        own = rows[ids == sample]
        # every row is one of this sample's positions, and no position is taken twice
        matches = [(positions[sample] == row).all(dim=1).nonzero().flatten().tolist() for row in own]
        assert all(len(match) == 1 for match in matches)
        assert len({match[0] for match in matches}) == per_sample


def test_conv_positions_cover_different_positions_in_neighbouring_samples():
    output = torch.arange(20.0).reshape(1, 1, 4, 5).expand(4, 1, 4, 5).contiguous()  # position index as value
    rows, _ = _reduce(output, per_sample=5)
    taken = rows.reshape(4, 5)
    assert sorted(taken.flatten().tolist()) == [float(p) for p in range(20)]


@pytest.mark.parametrize("per_sample", [3, 1000])
def test_conv_positions_deterministic_and_independent_of_chunking(conv_output, per_sample):
    rows, ids = _reduce(conv_output, per_sample=per_sample)
    again, again_ids = _reduce(conv_output, per_sample=per_sample)
    assert torch.equal(rows, again) and torch.equal(ids, again_ids)
    first, first_ids = _reduce(conv_output[:5], torch.arange(5), per_sample=per_sample)
    second, second_ids = _reduce(conv_output[5:], torch.arange(5, 10), per_sample=per_sample)
    assert torch.equal(torch.cat([first, second]), rows)
    assert torch.equal(torch.cat([first_ids, second_ids]), ids)


def test_conv_positions_depend_on_the_seed(conv_output):
    rows_a, _ = _reduce(conv_output, per_sample=3, seed=1)
    rows_b, _ = _reduce(conv_output, per_sample=3, seed=2)
    assert not torch.equal(rows_a, rows_b)


def test_conv_mean_and_flatten(conv_output):
    rows, ids = _reduce(conv_output, reduction="mean")
    torch.testing.assert_close(rows, conv_output.mean(dim=(2, 3)))
    assert ids.tolist() == list(range(10))
    rows, ids = _reduce(conv_output, reduction="flatten")
    torch.testing.assert_close(rows, conv_output.reshape(10, 60), rtol=0, atol=0)
    assert ids.tolist() == list(range(10))


def test_conv1d_positions():
    output = torch.randn(4, 3, 7, generator=_generator())
    rows, ids = _reduce(output)
    torch.testing.assert_close(rows, output.transpose(1, 2).reshape(28, 3), rtol=0, atol=0)
    assert ids.shape == (28,)


@pytest.mark.parametrize("shape", [(6, 5), (6,)])
def test_outputs_without_positions_pass_through(shape):
    output = torch.randn(*shape, generator=_generator())
    rows, ids = _reduce(output, layout="channels_last")
    torch.testing.assert_close(rows, output.reshape(6, -1), rtol=0, atol=0)
    assert ids.tolist() == list(range(6))


@pytest.fixture
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    """``(N=4, T=6, C=3)`` frames with lengths 6, 3, 1, 4; padded frames are NaN."""
    lengths = torch.tensor([6, 3, 1, 4])
    output = torch.randn(4, 6, 3, generator=_generator())
    for sample, length in enumerate(lengths.tolist()):
        output[sample, length:] = float("nan")
    return output, lengths


def test_sequence_frames_drop_padding(padded):
    output, lengths = padded
    rows, ids = _reduce(output, layout="channels_last", lengths=lengths)
    assert not rows.isnan().any()
    expected = torch.cat([output[i, :length] for i, length in enumerate(lengths.tolist())])
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    assert ids.tolist() == [0] * 6 + [1] * 3 + [2] + [3] * 4


@pytest.mark.parametrize("per_sample", [1, 2, 3, 5])
def test_sequence_frames_capped_are_valid_spread_frames(padded, per_sample):
    output, lengths = padded
    rows, ids = _reduce(output, layout="channels_last", lengths=lengths, per_sample=per_sample)
    assert not rows.isnan().any()
    for sample, length in enumerate(lengths.tolist()):
        own = rows[ids == sample]
        assert own.shape[0] == min(length, per_sample)
        frames = [int((output[sample, :length] == row).all(dim=1).nonzero()) for row in own]
        assert frames == sorted(set(frames))  # distinct, in time order
    again, _ = _reduce(output, layout="channels_last", lengths=lengths, per_sample=per_sample)
    assert torch.equal(rows, again)


def test_sequence_frames_without_lengths():
    output = torch.randn(3, 5, 2, generator=_generator())
    rows, ids = _reduce(output, layout="channels_last")
    torch.testing.assert_close(rows, output.reshape(15, 2), rtol=0, atol=0)
    rows, ids = _reduce(output, layout="channels_last", per_sample=2)
    assert rows.shape == (6, 2) and ids.tolist() == [0, 0, 1, 1, 2, 2]


def test_sequence_mean_is_a_masked_mean():
    output = torch.randn(4, 6, 3, generator=_generator())
    lengths = torch.tensor([6, 3, 1, 4])
    rows, ids = _reduce(output, layout="channels_last", reduction="mean", lengths=lengths)
    expected = torch.stack([output[i, :length].mean(dim=0) for i, length in enumerate(lengths.tolist())])
    torch.testing.assert_close(rows, expected)
    assert ids.tolist() == [0, 1, 2, 3]


def test_sequence_mean_ignores_non_finite_padding(padded):
    output, lengths = padded
    rows, _ = _reduce(output, layout="channels_last", reduction="mean", lengths=lengths)
    expected = torch.stack([output[i, :length].mean(dim=0) for i, length in enumerate(lengths.tolist())])
    torch.testing.assert_close(rows, expected)


def test_sequence_time_first_layout(padded):
    output, lengths = padded
    batch_first = _reduce(output, layout="channels_last", lengths=lengths, per_sample=2)
    time_first = _reduce(
        output.transpose(0, 1).contiguous(), torch.arange(4), layout="time_first", lengths=lengths, per_sample=2
    )
    assert torch.equal(batch_first[0], time_first[0]) and torch.equal(batch_first[1], time_first[1])


def test_lengths_rescaled_to_a_strided_time_axis():
    # A front end with stride 2: the mask has 8 frames, the layer 4.
    output = torch.randn(3, 4, 2, generator=_generator())
    lengths = torch.tensor([8, 5, 1])  # in mask frames -> 4, ceil(2.5) = 3, ceil(0.5) = 1 layer frames
    rows, ids = _reduce(output, layout="channels_last", lengths=lengths, mask_frames=8)
    torch.testing.assert_close(rows, torch.cat([output[0], output[1, :3], output[2, :1]]), rtol=0, atol=0)
    assert ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    rows, _ = _reduce(output, layout="channels_last", reduction="mean", lengths=lengths, mask_frames=8)
    torch.testing.assert_close(rows[1], output[1, :3].mean(dim=0))


def test_lengths_not_rescaled_when_the_time_axis_matches():
    output = torch.randn(2, 4, 2, generator=_generator())
    rows, ids = _reduce(output, layout="channels_last", lengths=torch.tensor([2, 4]), mask_frames=4)
    assert ids.tolist() == [0, 0, 1, 1, 1, 1]


def test_recorder_drops_padded_frames_of_a_sequence_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5))
    x = torch.randn(4, 6, 3)
    lengths = torch.tensor([6, 3, 1, 4])
    recorder = ActivationRecorder(model, [LayerSpec("0")], per_sample=100)
    with recorder, torch.no_grad():
        for first in (0, 2):
            recorder.start_chunk(first, lengths[first : first + 2], 2, CPU)
            model(x[first : first + 2])
    with torch.no_grad():
        out = model(x)
    expected = torch.cat([out[i, :length] for i, length in enumerate(lengths.tolist())])
    torch.testing.assert_close(recorder.activations["0"], expected)
    assert recorder.sample_ids["0"].tolist() == [0] * 6 + [1] * 3 + [2] + [3] * 4


def test_conv1d_sequence_output_honours_the_padding_mask():
    """A Conv1d over a padded sequence gives (N, C, L): its frames are datapoints and padded ones are dropped."""
    output = torch.randn(3, 4, 5)
    lengths = torch.tensor([5, 2, 3])
    output[1, :, 2:] = float("nan")
    output[2, :, 3:] = float("nan")
    rows, ids = reduce_output(
        output,
        layout="channels_first",
        reduction="positions",
        sample_ids=torch.arange(3),
        per_sample=10,
        seed=0,
        lengths=lengths,
    )
    assert rows.shape == (10, 4) and bool(torch.isfinite(rows).all())
    assert ids.tolist() == [0] * 5 + [1] * 2 + [2] * 3


# ----------------------------------------------------------------------------------------------------------------
# Default layers: repeated blocks, stems and heads
# ----------------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.fc(x)) + x)


class _FirstBlock(_Block):
    """A stage's first block of another type (a downsampling block)."""


class _Other(_Block):
    pass


def _container_model(*blocks: nn.Module) -> nn.Module:
    model = nn.Module()
    model.stem = nn.Linear(2, 4)
    model.norm = nn.LayerNorm(4)  # a lone norm is neither stem nor head
    model.body = nn.Module()
    model.body.blocks = nn.ModuleList(blocks)
    model.body.scale = nn.Linear(4, 4)  # beside the blocks, inside their parent
    model.drop = nn.Dropout()
    model.head = nn.Linear(4, 1)
    return model


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        ((_Block(), _Block(), _Block()), ["body.blocks.0", "body.blocks.1", "body.blocks.2"]),
        ((_FirstBlock(), _Block(), _Block()), ["body.blocks.0", "body.blocks.1", "body.blocks.2"]),
    ],
    ids=["identical", "first-differs"],
)
def test_default_layers_take_repeated_blocks_stems_and_heads(blocks, expected):
    """The Linear stem is a linear map of the input (1 against every reference): left out, with no nonlinearity
    after it to take its place."""
    names = default_layers(_container_model(*blocks))
    assert names == [*expected, "body.scale", "head"]
    model = _container_model(*blocks)
    model.stem = nn.Sequential(nn.Linear(2, 4), nn.GELU())  # a stem with its own nonlinearity stays
    assert default_layers(model) == ["stem", *expected, "body.scale", "head"]


@pytest.mark.parametrize(
    "blocks",
    [
        (_Block(), _Other()),  # two different sublayers (a T5 block's attention + feed-forward)
        (_Block(), _Other(), _Block()),
        (_Block(),),  # one block is not a repetition
        (nn.Linear(4, 4), nn.Linear(4, 4)),  # leaf layers are not blocks
    ],
    ids=["two-types", "mixed", "single", "leaves"],
)
def test_containers_that_are_not_block_stages_fall_back_to_every_layer(blocks):
    model = _container_model(*blocks)
    names = default_layers(model)
    assert "stem" in names and "head" in names
    assert all(isinstance(model.get_submodule(name), (nn.Linear,)) for name in names)


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def test_decoder_only_default_layers_are_the_blocks_and_the_head():
    """A LLaMA-like layout: token table, blocks, a custom final norm, an output head."""
    model = nn.Module()
    model.embed_tokens = nn.Embedding(10, 4)
    model.layers = nn.ModuleList([_Block(), _Block()])
    model.norm = RMSNorm(4)
    model.lm_head = nn.Linear(4, 10)
    assert default_layers(model) == ["layers.0", "layers.1", "lm_head"]


def test_nested_block_containers_take_the_outermost():
    stages = nn.Sequential(nn.Sequential(_Block(), _Block()), nn.Sequential(_Block(), _Block()))
    assert default_layers(stages) == ["0", "1"]


def test_format_layers_folds_numbered_runs():
    names = ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.3", "fc"]
    assert format_layers(names) == "7 layers: conv1, layer1.{0..1}, layer2.{0..1}, layer2.3, fc"
    assert format_layers(["fc"]) == "1 layer: fc"


# ----------------------------------------------------------------------------------------------------------------
# Layout guesses and strided time axes
# ----------------------------------------------------------------------------------------------------------------


class _Scrambler(nn.Module):
    """A parameter-free output whose channel axis cannot be told from the Linear before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, 3)


def test_a_wrong_looking_guess_warns_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 2), _Scrambler())  # (N, 6, 2) -> (N, 4, 3): 3 features, 2 channels
    with pytest.warns(LayoutWarning, match=r"layer '1'.*3 features.*2 channels.*'layout'"):
        _record(model, [LayerSpec("1")], torch.randn(5, 6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _record(model, [LayerSpec("1", layout="channels_last")], torch.randn(5, 6, 4))


def test_a_parameter_free_layer_after_a_conv1d_is_channels_first():
    model = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU())
    recorder = _record(model, [LayerSpec("1")], torch.randn(4, 3, 7))
    assert recorder.layouts["1"] == "channels_first" and recorder.activations["1"].shape == (4 * 5, 5)


class _Frontend(nn.Module):
    """A strided conv and pooling front end, then a per-frame Linear: (N, 1, L) -> (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, kernel_size=5, stride=3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x[:, None, :])).transpose(1, 2))


def test_frame_lengths_follow_the_strided_layers_exactly():
    lengths = torch.tensor([60, 47, 31, 10])
    mask_frames = 60
    model = _Frontend()
    recorder = ActivationRecorder(
        model, resolve_layers(model, ["conv", "fc"], "positions"), per_sample=1000, mask_frames=mask_frames
    )
    with recorder, torch.no_grad():
        recorder.start_chunk(0, lengths, 4, CPU)
        model(torch.randn(4, mask_frames))
    after_conv = (lengths + 2 * 1 - 5) // 3 + 1  # floor((L + 2p - k) / s) + 1
    after_pool = after_conv // 2
    torch.testing.assert_close(recorder.frame_lengths(lengths, 20), after_conv)
    torch.testing.assert_close(recorder.frame_lengths(lengths, 10), after_pool)
    assert recorder.activations["conv"].shape[0] == int(after_conv.sum())
    assert recorder.activations["fc"].shape[0] == int(after_pool.sum())


def test_frame_lengths_prefer_the_given_hook():
    model = _Frontend()
    recorder = ActivationRecorder(model, [], per_sample=1, mask_frames=60, output_lengths=lambda n: n // 6)
    torch.testing.assert_close(recorder.frame_lengths(torch.tensor([60, 35]), 10), torch.tensor([10, 5]))
    # an unknown frame count without strided layers seen: the proportional rescale
    torch.testing.assert_close(recorder.frame_lengths(torch.tensor([60, 35]), 12), torch.tensor([12, 7]))
