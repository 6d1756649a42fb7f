"""Tests of pipeline.probe: building a fixed probe from every accepted source, and running it harmlessly."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_svcca.pipeline.layers import LayerSpec
from lightning_svcca.pipeline.probe import Probe, batch_size, build_probe, probe_indices, run_probe
from lightning_svcca.pipeline.recording import ActivationRecorder

CPU = torch.device("cpu")


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(40, 5, generator=generator), torch.arange(40)


# ----------------------------------------------------------------------------------------------------------------
# build_probe
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [(None, 40), (7, 7), (40, 40), (100, 40)])
def test_tensor_probe_keeps_the_first_samples(xy, size, expected):
    x, _ = xy
    probe = build_probe(x, size)
    assert probe.size == expected
    assert probe.input_key is None
    torch.testing.assert_close(probe.batch, x[:expected], rtol=0, atol=0)
    assert probe.inputs(probe.batch) is probe.batch


@pytest.mark.parametrize("container", [tuple, list])
def test_sequence_batch_takes_element_zero_as_input(xy, container):
    x, y = xy
    probe = build_probe(container([x, y]), 10)
    assert isinstance(probe.batch, container)
    assert probe.size == 10
    assert probe.input_key == 0
    torch.testing.assert_close(probe.inputs(probe.batch), x[:10], rtol=0, atol=0)
    torch.testing.assert_close(probe.batch[1], y[:10], rtol=0, atol=0)


def test_sequence_batch_with_explicit_input_index(xy):
    x, y = xy
    probe = build_probe((y, x), None, input_key=1)
    torch.testing.assert_close(probe.inputs(probe.batch), x, rtol=0, atol=0)


def test_dict_batch_with_probe_input_key(xy):
    x, y = xy
    probe = build_probe({"image": x, "label": y}, 8, input_key="image")
    assert probe.size == 8 and probe.input_key == "image"
    torch.testing.assert_close(probe.inputs(probe.batch), x[:8], rtol=0, atol=0)
    torch.testing.assert_close(probe.batch["label"], y[:8], rtol=0, atol=0)


def test_dict_batch_with_a_single_tensor_is_passed_as_keywords(xy):
    """One key or many, a dict probe is called as model(**probe); only probe_input unwraps it."""
    x, _ = xy

    class TakesKeywords(nn.Module):
        def forward(self, **batch):
            self.keys = sorted(batch)
            return batch["image"]

    probe = build_probe({"image": x, "name": "digits"}, None)
    assert probe.input_key is None
    model = TakesKeywords()
    run_probe(model, probe, chunk_size=16, device=torch.device("cpu"))
    assert model.keys == ["image", "name"]
    assert build_probe({"image": x}, None, input_key="image").inputs({"image": x}) is x


def test_dict_batch_without_input_key_is_passed_as_keywords(xy):
    x, y = xy

    class Takes(nn.Module):
        def forward(self, image, scale=1.0):  # no `label` parameter: that key is left out
            self.seen = image * scale
            return self.seen

    probe = build_probe({"image": x, "label": y, "scale": torch.full((40, 1), 2.0)}, None)
    assert probe.input_key is None and probe.mask_key is None
    model = Takes()
    run_probe(model, probe, chunk_size=100, device=torch.device("cpu"))
    torch.testing.assert_close(model.seen, 2 * x, rtol=0, atol=0)


def test_dict_batch_the_model_cannot_take_names_the_keys(xy):
    x, y = xy

    class TwoInputs(nn.Module):
        def forward(self, a, b):
            return a + b

    probe = build_probe({"image": x, "label": y}, None)
    with pytest.raises(ValueError, match=r"none of which TwoInputs.forward takes.*probe_input") as error:
        run_probe(TwoInputs(), probe, chunk_size=100, device=torch.device("cpu"))
    assert "'image'" in str(error.value) and "'label'" in str(error.value)


def test_dict_batch_goes_whole_to_a_forward_taking_the_batch(xy):
    x, y = xy

    class TakesBatch(nn.Module):
        def forward(self, batch):
            self.seen = batch["image"] + batch["label"][:, None]
            return self.seen

    probe = build_probe({"image": x, "label": y}, None)
    model = TakesBatch()
    run_probe(model, probe, chunk_size=100, device=torch.device("cpu"))
    torch.testing.assert_close(model.seen, x + y[:, None], rtol=0, atol=0)


def test_dict_batch_with_unknown_input_key_names_the_keys(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"probe_input='pixels'.*\['image', 'label'\]"):
        build_probe({"image": x, "label": y}, None, input_key="pixels")


@pytest.mark.parametrize(
    ("source", "kwargs", "match"),
    [
        ((torch.zeros(4, 2), torch.zeros(4)), {"input_key": 2}, "not an index"),
        ((torch.zeros(4, 2), torch.zeros(4)), {"mask_key": 5}, "probe_mask=5"),
        (torch.zeros(4, 2), {"input_key": "x"}, "single tensor"),
        (torch.zeros(4, 2), {}, None),
    ],
)
def test_bad_keys_raise(source, kwargs, match):
    if match is None:
        build_probe(source, None, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        build_probe(source, None, **kwargs)


@pytest.mark.parametrize(
    "batch",
    [
        (torch.zeros(10, 3), torch.zeros(9)),
        {"x": torch.zeros(10, 3), "y": torch.zeros(12)},
        [torch.zeros(10, 3), [torch.zeros(10), torch.zeros(11, 2)]],
    ],
    ids=["tuple", "dict", "nested"],
)
def test_disagreeing_batch_sizes_raise(batch):
    with pytest.raises(ValueError, match=r"disagree on the number of samples"):
        build_probe(batch, None, input_key="x" if isinstance(batch, dict) else None)


@pytest.mark.parametrize(
    ("source", "size", "error", "match"),
    [
        (torch.zeros(4, 2), 0, ValueError, "probe_size must be >= 1"),
        (torch.zeros(0, 2), None, ValueError, "empty"),
        (3.0, None, TypeError, "probe must be a tensor"),
        ("path/to/data", None, TypeError, "probe must be a tensor"),
        (DataLoader(TensorDataset(torch.zeros(4, 2))), None, ValueError, "needs probe_size"),
    ],
)
def test_invalid_sources_raise(source, size, error, match):
    with pytest.raises(error, match=match):
        build_probe(source, size)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_probe_is_a_seeded_subset_of_the_dataset(xy, shuffle):
    x, y = xy
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=shuffle)
    torch.manual_seed(123)  # the global random state plays no part
    first = build_probe(loader, 15)
    torch.manual_seed(456)
    second = build_probe(loader, 15)
    assert first.size == 15 and first.input_key == 0
    # y is arange(40): the labels are the chosen indices, distinct, sorted and not simply the first 15
    chosen = first.batch[1].tolist()
    assert chosen == sorted(set(chosen)) and chosen != list(range(15))
    assert chosen == probe_indices(40, 15, seed=0)
    torch.testing.assert_close(first.batch[0], x[chosen], rtol=0, atol=0)
    assert first.fingerprint() == second.fingerprint()
    for a, b in zip(first.batch, second.batch, strict=True):
        assert torch.equal(a, b)


def test_dataloader_probe_uses_the_collate_fn(xy):
    x, y = xy

    def to_dict(samples):
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, collate_fn=to_dict)
    probe = build_probe(loader, 9, input_key="x")
    torch.testing.assert_close(probe.inputs(probe.batch), x[probe_indices(40, 9)], rtol=0, atol=0)


class _Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y, strict=True)


@pytest.mark.parametrize(("size", "loader_batch"), [(7, 3), (6, 3), (40, 16), (100, 16)])
def test_iterable_dataset_probe_takes_the_first_streamed_samples(xy, size, loader_batch):
    x, y = xy
    probe = build_probe(DataLoader(_Stream(x, y), batch_size=loader_batch), size)
    expected = min(size, 40)
    assert probe.size == expected
    torch.testing.assert_close(probe.batch[0], x[:expected], rtol=0, atol=0)
    torch.testing.assert_close(probe.batch[1], y[:expected], rtol=0, atol=0)


_Pair = namedtuple("_Pair", ["image", "label"])


class _PairDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> _Pair:
        return _Pair(self.x[index], self.y[index])


class _PairStream(_Stream):
    def __iter__(self):
        for image, label in zip(self.x, self.y, strict=True):
            yield _Pair(image, label)


def test_namedtuple_batches(xy):
    x, y = xy
    for source, chosen in (
        (_Pair(x, y), list(range(6))),
        (DataLoader(_PairDataset(x, y), batch_size=4, shuffle=True), probe_indices(40, 6)),
    ):
        probe = build_probe(source, 6)
        assert isinstance(probe.batch, _Pair) and probe.size == 6
        torch.testing.assert_close(probe.batch.image, x[chosen], rtol=0, atol=0)
        torch.testing.assert_close(probe.inputs(probe.batch), x[chosen], rtol=0, atol=0)
        assert isinstance(next(probe.chunks(4))[1], _Pair)


def test_namedtuple_batches_from_an_iterable_loader(xy):
    x, y = xy
    probe = build_probe(DataLoader(_PairStream(x, y), batch_size=4), 6)
    assert isinstance(probe.batch, _Pair) and probe.size == 6
    torch.testing.assert_close(probe.batch.label, y[:6], rtol=0, atol=0)


def test_empty_iterable_loader_raises():
    empty = DataLoader(_Stream(torch.zeros(0, 2), torch.zeros(0)), batch_size=2)
    with pytest.raises(ValueError, match="no batches"):
        build_probe(empty, 4)


def test_chunks_cover_the_probe_in_order(xy):
    x, _ = xy
    probe = build_probe(x, None)
    chunks = list(probe.chunks(16))
    assert [first for first, _ in chunks] == [0, 16, 32]
    assert [batch_size(chunk) for _, chunk in chunks] == [16, 16, 8]
    torch.testing.assert_close(torch.cat([chunk for _, chunk in chunks]), x, rtol=0, atol=0)
    assert [first for first, _ in probe.chunks(4, start=10, stop=18)] == [10, 14]


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool), [2, 1, 3]),
        (torch.tensor([2, 1, 3]), [2, 1, 3]),
    ],
    ids=["mask", "lengths"],
)
def test_probe_lengths_from_mask_or_lengths(mask, expected):
    probe = build_probe((torch.zeros(3, 3, 2), mask), None, mask_key=1)
    assert probe.lengths(probe.batch).tolist() == expected


# ----------------------------------------------------------------------------------------------------------------
# run_probe
# ----------------------------------------------------------------------------------------------------------------


class _Mixed(nn.Module):
    """A model with BatchNorm, Dropout and a submodule left in eval mode (a frozen block)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.frozen(self.drop(self.bn(self.fc1(x)))))


@pytest.fixture
def mixed_model() -> _Mixed:
    torch.manual_seed(0)
    model = _Mixed()
    model.train()
    model.frozen.eval()
    # Non-trivial running statistics, so "unchanged" is not "still at their defaults".
    model(torch.randn(32, 5))
    return model


def test_run_probe_restores_training_flags(mixed_model, xy):
    x, _ = xy
    before = {name: module.training for name, module in mixed_model.named_modules()}
    assert set(before.values()) == {True, False}
    seen = {}

    def forward(model, chunk):
        seen.update({name: module.training for name, module in model.named_modules()})
        model(chunk)

    run_probe(mixed_model, build_probe(x, None), chunk_size=16, device=CPU, forward_fn=forward)
    assert not any(seen.values()), "the probe must run in eval mode"
    assert {name: module.training for name, module in mixed_model.named_modules()} == before


def test_run_probe_restores_training_flags_after_an_error(mixed_model, xy):
    x, _ = xy
    before = {name: module.training for name, module in mixed_model.named_modules()}

    def broken(model, chunk):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_probe(mixed_model, build_probe(x, None), chunk_size=16, device=CPU, forward_fn=broken)
    assert {name: module.training for name, module in mixed_model.named_modules()} == before


def test_run_probe_leaves_batchnorm_statistics_bit_identical(mixed_model, xy):
    x, _ = xy
    before = {name: buffer.clone() for name, buffer in mixed_model.named_buffers()}
    run_probe(mixed_model, build_probe(x * 10 + 3, None), chunk_size=7, device=CPU)
    after = dict(mixed_model.named_buffers())
    assert before.keys() == after.keys()
    for name, buffer in before.items():
        assert torch.equal(buffer, after[name]), name


def test_run_probe_leaves_the_rng_state_unchanged(mixed_model, xy):
    x, _ = xy

    def forward(model, chunk):
        torch.rand(100)  # a forward pass that draws random numbers (sampling, noise layers, ...)
        model(chunk)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    run_probe(mixed_model, build_probe(x, None), chunk_size=8, device=CPU, forward_fn=forward)
    assert torch.equal(torch.get_rng_state(), state)


def test_run_probe_creates_no_gradients(mixed_model, xy):
    x, _ = xy
    outputs = []
    run_probe(
        mixed_model, build_probe(x, None), chunk_size=16, device=CPU, forward_fn=lambda m, c: outputs.append(m(c))
    )
    assert all(parameter.grad is None for parameter in mixed_model.parameters())
    assert outputs and not any(output.requires_grad for output in outputs)
    assert all(parameter.requires_grad for parameter in mixed_model.parameters())


def test_run_probe_rejects_a_bad_chunk_size(mixed_model, xy):
    with pytest.raises(ValueError, match="probe_batch_size must be >= 1"):
        run_probe(mixed_model, build_probe(xy[0], None), chunk_size=0, device=CPU)


def _record(model: nn.Module, probe: Probe, chunk_size: int, names: list[str], **kwargs) -> dict[str, torch.Tensor]:
    recorder = ActivationRecorder(model, [LayerSpec(name) for name in names], per_sample=64)

    def before_chunk(first, chunk):
        recorder.start_chunk(first, probe.lengths(chunk), batch_size(chunk), CPU)

    with recorder:
        run_probe(model, probe, chunk_size=chunk_size, device=CPU, before_chunk=before_chunk, **kwargs)
    return {name: (recorder.activations[name], recorder.sample_ids[name]) for name in names}


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 40, 1000])
def test_chunking_does_not_change_the_recorded_activations(mixed_model, xy, chunk_size):
    x, _ = xy
    probe = build_probe(x, None)
    names = ["fc1", "bn", "frozen.1", "fc2"]
    whole = _record(mixed_model, probe, 40, names)
    chunked = _record(mixed_model, probe, chunk_size, names)
    for name in names:
        torch.testing.assert_close(chunked[name][0], whole[name][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(chunked[name][1], whole[name][1])
        assert chunked[name][1].tolist() == list(range(40))


def test_chunking_with_start_and_stop_records_that_range(mixed_model, xy):
    x, _ = xy
    probe = build_probe(x, None)
    whole = _record(mixed_model, probe, 40, ["fc2"])["fc2"]
    part = _record(mixed_model, probe, 4, ["fc2"], start=10, stop=25)["fc2"]
    assert part[1].tolist() == list(range(10, 25))
    torch.testing.assert_close(part[0], whole[0][10:25], rtol=1e-6, atol=1e-6)


def test_custom_forward_fn_is_used(mixed_model, xy):
    x, y = xy
    probe = build_probe({"features": x, "label": y}, None, input_key="features")
    calls = []

    def forward(model, chunk):
        calls.append(sorted(chunk))
        return model(chunk["features"] * 0)

    recorded = _record(mixed_model, probe, 16, ["fc1"], forward_fn=forward)["fc1"][0]
    assert calls == [["features", "label"]] * 3  # the whole chunk, not just the input
    expected = mixed_model.fc1.bias.detach().expand(40, -1)  # inputs were zeroed by forward_fn
    torch.testing.assert_close(recorded, expected, rtol=0, atol=0)


def test_default_forward_calls_the_model_on_the_input(mixed_model, xy):
    x, y = xy
    probe = build_probe((x, y), None)
    recorded = _record(mixed_model, probe, 16, ["fc1"])["fc1"][0]
    torch.testing.assert_close(recorded, mixed_model.fc1(x).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[False, True, True], [False, False, True]]),  # left padding
        torch.tensor([[False, False, True], [False, True, True]]),  # PyTorch's src_key_padding_mask convention
    ],
)
def test_a_mask_that_is_not_right_padding_is_refused(mask):
    batch = (torch.randn(2, 3, 4), mask)
    with pytest.raises(ValueError, match="right padding"):
        build_probe(batch, None, mask_key=1)
