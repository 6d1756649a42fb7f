"""The probe: a fixed set of samples run through the model at every measurement.

A probe is built once, from a tensor, a batch (tuple, list or dict of tensors) or a DataLoader, and kept on the
CPU for the whole run. :func:`run_probe` feeds it to the model in chunks under ``torch.no_grad()`` and eval
mode, and leaves the model as it found it.

Dict batches follow the Hugging Face convention: the model is called as ``model(**batch)``, whatever the number of
keys (keys its ``forward`` does not take, such as ``labels``, are left out; ``probe_input=<key>`` calls
``model(batch[key])`` instead), and a key ``attention_mask`` is the padding mask (1 = real token or sample,
padding on the right).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

__all__ = [
    "DEFAULT_MASK_KEY",
    "ForwardFn",
    "Probe",
    "batch_size",
    "build_probe",
    "default_forward",
    "eager_stance",
    "probe_indices",
    "run_probe",
    "slice_batch",
]

#: the key of a dict batch that is its padding mask unless ``mask_key`` says otherwise (Hugging Face's name)
DEFAULT_MASK_KEY = "attention_mask"

#: ``forward_fn(model, batch_chunk)`` runs the model on a chunk of the probe batch; its return value is ignored.
ForwardFn = Callable[[nn.Module, Any], Any]


@dataclass(frozen=True)
class Probe:
    """A fixed probe batch on the CPU.

    Attributes:
        batch: the samples, a tensor or a (nested) tuple, list or dict of tensors, all with ``size`` rows.
        size: number of samples.
        input_key: which part of ``batch`` the model takes (an index or key; ``None`` for a bare tensor, or for a
            dict passed whole as keyword arguments).
        mask_key: which part of ``batch`` holds a sequence padding mask ``(N, T)`` (True = real frame) or
            lengths ``(N,)``; ``None`` when there is none.
    """

    batch: Any
    size: int
    input_key: int | str | None = None
    mask_key: int | str | None = None

    def inputs(self, batch: Any) -> Any:
        """The model input of a (chunk of the) probe batch."""
        return batch if self.input_key is None else batch[self.input_key]

    def lengths(self, batch: Any) -> Tensor | None:
        """Valid frames per sample of a chunk, from the padding mask or lengths, or ``None``."""
        if self.mask_key is None:
            return None
        mask = batch[self.mask_key]
        return mask.to(torch.long) if mask.ndim == 1 else mask.to(torch.bool).sum(dim=1)

    def chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(first sample index, chunk)`` over samples ``[start, stop)`` in chunks of ``chunk_size``."""
        stop = self.size if stop is None else stop
        for first in range(start, stop, chunk_size):
            yield first, slice_batch(self.batch, first, min(first + chunk_size, stop))

    def fingerprint(self) -> str:
        """A short hash of the probe's contents, to tell whether a resumed run uses the same probe."""
        digest = hashlib.sha256()
        for tensor in _tensors(self.batch):
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def build_probe(
    source: Any,
    size: int | None,
    *,
    input_key: int | str | None = None,
    mask_key: int | str | bool | None = None,
    seed: int = 0,
) -> Probe:
    """Build a :class:`Probe` from a tensor, a batch or a DataLoader.

    Args:
        source: a tensor (the model input itself), a batch (tuple, list or dict of tensors sharing their first
            dimension), or a DataLoader.
        size: keep the first ``size`` samples (``None``: all of a tensor or batch; required for a DataLoader).
            From a DataLoader over a map-style dataset the samples are ``size`` indices drawn at random without
            replacement, the same for a given ``seed`` and dataset length (:func:`probe_indices`), put together
            with the loader's ``collate_fn``: the probe covers a class-sorted dataset, does not depend on the
            loader's shuffling or sampler, and is the same on every rank and after a resume. An iterable dataset
            gives its first ``size`` samples.
        input_key: the part of a batch that is the model input: an index for tuples and lists (default 0), a key
            for dicts (default: the whole dict as keyword arguments, ``model(**batch)``, whatever its number of
            keys; a key calls ``model(batch[key])``).
        mask_key: the part of a batch holding a padding mask ``(N, T)`` (1 = real frame, right padding) or
            lengths ``(N,)``; default ``"attention_mask"`` when a dict batch has that key; ``False``: no mask.
        seed: seeds the choice of a DataLoader probe's samples.

    Returns:
        The probe, on the CPU.

    Raises:
        TypeError: ``source`` is none of the accepted types.
        ValueError: the probe is empty, parts of a batch disagree on the number of samples, or a key is unknown.
    """
    if size is not None and size < 1:
        raise ValueError(f"probe_size must be >= 1, got {size}")
    if isinstance(source, DataLoader):
        if size is None:
            raise ValueError("a DataLoader probe needs probe_size: the number of samples to take from it")
        batch = _collect(source, size, seed)
    elif isinstance(source, (Tensor, Mapping, Sequence)) and not isinstance(source, str):
        batch = source
    else:
        raise TypeError(
            "probe must be a tensor, a batch (tuple, list or dict of tensors) or a DataLoader, got"
            f" {type(source).__name__}"
        )
    batch = _to_cpu(batch)
    n = batch_size(batch)
    if n == 0:
        raise ValueError("the probe is empty: it needs at least 2 samples")
    if size is not None and size < n:
        batch, n = slice_batch(batch, 0, size), size
    return Probe(batch, n, *_batch_keys(batch, input_key, mask_key))


def _batch_keys(
    batch: Any, input_key: int | str | None, mask_key: int | str | bool | None
) -> tuple[int | str | None, int | str | None]:
    """The input's and the mask's places in ``batch``, defaults filled in and checked against the batch."""
    if input_key is None and isinstance(batch, Sequence):
        input_key = 0
    if mask_key is False:
        mask_key = None
    elif mask_key is None and isinstance(batch, Mapping) and DEFAULT_MASK_KEY in batch:
        mask_key = DEFAULT_MASK_KEY
    for role, key in (("probe_input", input_key), ("probe_mask", mask_key)):
        if key is not None:
            _check_key(batch, key, role)
    if mask_key is not None:
        _check_mask(batch[mask_key])
    return input_key, mask_key


def _check_mask(mask: Tensor) -> None:
    """A padding mask must mark real frames True on a prefix of each row (right padding), or be lengths."""
    if mask.ndim == 1:
        if mask.is_floating_point() or bool((mask < 0).any()):
            raise ValueError("probe_mask as lengths must hold non-negative integers, one per sample")
        return
    if mask.ndim != 2:
        raise ValueError(f"probe_mask must be (N, T) or lengths (N,), got shape {tuple(mask.shape)}")
    real = mask.to(torch.bool)
    count = real.sum(dim=1, keepdim=True)
    prefix = torch.arange(real.shape[1]) < count
    if torch.equal(real, prefix):
        return
    suffix = torch.arange(real.shape[1]) >= real.shape[1] - count
    if torch.equal(real, suffix):
        raise ValueError(
            "the probe's padding mask is left-padded (real frames at the end of each row), but frames are matched"
            " from the start: use right padding (a Hugging Face tokenizer: padding_side='right'); if the mask is"
            " PyTorch's src_key_padding_mask (True = padded), pass ~mask"
        )
    raise ValueError(
        "probe_mask must be True on the real frames at the start of each row (right padding). PyTorch's"
        " src_key_padding_mask is the opposite (True = padded): pass ~mask"
    )


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model(inputs)``, or ``model(**inputs)`` for a dict: what runs unless a ``forward_fn`` is given.

    A dict's keys that ``model.forward`` does not accept (``labels``, an ``id`` column) are left out, unless it
    takes ``**kwargs``. A ``forward(self, batch)`` that takes none of the keys gets the dict whole.

    Raises:
        ValueError: none of a dict's keys is a parameter of ``model.forward``, which takes more than one.
    """
    if not isinstance(inputs, Mapping):
        return model(inputs)
    signature = _signature(model)
    if signature is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return model(**inputs)
    named = {
        name: parameter
        for name, parameter in signature.parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    kwargs = {key: value for key, value in inputs.items() if key in named}
    if kwargs:
        return model(**kwargs)
    parameters = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(parameters) == 1 and parameters[0].kind in positional:
        return model(inputs)  # forward(self, batch): the dict is the batch
    raise ValueError(
        f"the probe is a dict with keys {list(inputs)}, none of which {type(model).__name__}.forward takes"
        f" (its parameters: {list(signature.parameters)}); name the input with probe_input=<key>, or pass"
        " forward_fn=lambda model, batch: ..."
    )


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def run_probe(  # noqa: PLR0913 - keyword-only: the pass's range and optional hooks, each named at its call
    model: nn.Module,
    probe: Probe,
    *,
    chunk_size: int,
    device: torch.device,
    forward_fn: ForwardFn | None = None,
    start: int = 0,
    stop: int | None = None,
    before_chunk: Callable[[int, Any], None] | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    convert: Callable[[Any], Any] | None = None,
    on_output: Callable[[Any], None] | None = None,
) -> None:
    """Run samples ``[start, stop)`` of the probe through ``model``, leaving the model exactly as it was.

    The model runs in eval mode under ``torch.no_grad()``; afterwards every module's training flag is restored,
    and so are the RNG states of the CPU and of the model's device (so a probe never shifts the training run's
    random stream). Eval mode means BatchNorm uses, and does not update, its running statistics. Compiled modules
    (``torch.compile``, anywhere in the model) run eagerly (:func:`eager_stance`): the same modules and weights,
    without compiling the user's model for eval mode, no-grad and the recorder's hooks.

    Args:
        model: the module to run (the bare LightningModule, never a DDP wrapper).
        probe: the probe.
        chunk_size: samples per forward pass.
        device: where the chunks go.
        forward_fn: ``forward_fn(model, chunk)`` runs the model on a whole chunk of the batch; by default
            ``model(probe.inputs(chunk))``, or ``model(**inputs)`` for a dict (:func:`default_forward`).
        start: first sample (for a sharded probe).
        stop: one past the last sample.
        before_chunk: called with ``(first sample index, chunk)`` before each forward pass (activation
            recorders use it to know which samples they see).
        forward_context: a factory of the context to run forward passes in (e.g. the trainer's precision
            autocast).
        convert: applied to each chunk on the device before the forward pass (e.g. the trainer's precision
            casting floating inputs to a ``bf16-true`` model's dtype).
        on_output: called with each chunk's output (what the forward pass returned).
    """
    if chunk_size < 1:
        raise ValueError(f"probe_batch_size must be >= 1, got {chunk_size}")
    modes = {module: module.training for module in model.modules()}
    devices = [device] if device.type == "cuda" else []
    context = forward_context or contextlib.nullcontext
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), eager_stance():
            if any(modes.values()):
                model.eval()
            for first, chunk in probe.chunks(chunk_size, start, stop):
                chunk = _to_device(chunk, device)
                if convert is not None:
                    chunk = convert(chunk)
                if before_chunk is not None:
                    before_chunk(first, chunk)
                with context():
                    if forward_fn is None:
                        output = default_forward(model, probe.inputs(chunk))
                    else:
                        output = forward_fn(model, chunk)
                if on_output is not None:
                    on_output(output)
    finally:
        for module, training in modes.items():
            if module.training != training:  # nn.Module's __setattr__ is slow: write only the flags eval() changed
                module.training = training


def eager_stance() -> contextlib.AbstractContextManager:
    """A context in which every ``torch.compile`` d module or function runs eagerly (``force_eager``).

    Why: a probe pass through a compiled model would otherwise make dynamo trace it in eval mode, under
    ``no_grad`` and with forward hooks whose names and seeds it guards on: a new graph per hooked layer, graph
    breaks and recompile warnings for the user's model. Running eagerly uses the same modules and weights. Inside
    a region dynamo is already compiling, the stance cannot change and nothing is done.
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``[start, stop)`` of a tensor or a nested tuple/list/dict/dataclass of tensors."""
    return _map_tensors(batch, lambda tensor: tensor[start:stop])


def probe_indices(length: int, size: int, seed: int = 0) -> list[int]:
    """The dataset indices of a DataLoader probe: ``size`` of ``range(length)`` drawn without replacement.

    A function of its arguments alone (its own generator, not the global random state), so every rank and every
    resumed run draws the same samples. Sorted, so the probe keeps the dataset's order; all indices when
    ``size >= length``.

    Example:
        >>> probe_indices(5, 10)
        [0, 1, 2, 3, 4]
        >>> probe_indices(1000, 4, seed=0) == probe_indices(1000, 4, seed=0) != probe_indices(1000, 4, seed=1)
        True
    """
    if size >= length:
        return list(range(length))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=generator)[:size].tolist())


_EMPTY_PROBE = (
    "the probe DataLoader holds no samples (an empty dataset, or a stream that yielded no batches): the probe"
    " needs at least 2. Pass"
    " probe=<tensor, batch or a DataLoader with data>; with probe=None the probe is taken from the validation"
    " DataLoader, else the training one, so check that it holds data"
)


def _collect(loader: DataLoader, size: int, seed: int = 0) -> Any:
    """A seeded random subset of a loader's dataset (the first samples of a stream), whatever its sampler."""
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        if len(dataset) == 0:
            raise ValueError(_EMPTY_PROBE)
        collate = loader.collate_fn or torch.utils.data.default_collate
        return collate([dataset[i] for i in probe_indices(len(dataset), size, seed)])
    batches, seen = [], 0
    for batch in loader:
        batches.append(_to_cpu(batch))
        seen += batch_size(batch)
        if seen >= size:
            break
    if not batches:
        raise ValueError(_EMPTY_PROBE)
    return slice_batch(_concatenate(batches), 0, size)


def _concatenate(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: _concatenate([batch[key] for batch in batches]) for key in first}
    if isinstance(first, Sequence):
        parts = [_concatenate(list(group)) for group in zip(*batches, strict=True)]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    raise TypeError(f"cannot concatenate probe batches of type {type(first).__name__}")


def batch_size(batch: Any) -> int:
    """Number of samples of a batch (the shared first dimension of its tensors)."""
    sizes = {int(tensor.shape[0]) for tensor in _tensors(batch) if tensor.ndim > 0}
    if not sizes:
        raise ValueError("the probe holds no tensors with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(f"the parts of the probe batch disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        for value in batch:
            yield from _tensors(value)
    elif is_dataclass(batch) and not isinstance(batch, type):
        for field in fields(batch):
            yield from _tensors(getattr(batch, field.name))


def _map_tensors(batch: Any, function: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return function(batch) if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        return {key: _map_tensors(value, function) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(value, function) for value in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(_map_tensors(value, function) for value in batch)
    if is_dataclass(batch) and not isinstance(batch, type):
        changes = {field.name: _map_tensors(getattr(batch, field.name), function) for field in fields(batch)}
        return replace(batch, **changes)
    return batch


def _to_cpu(batch: Any) -> Any:
    return _map_tensors(batch, lambda tensor: tensor.detach().cpu())


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=True))


def _check_key(batch: Any, key: int | str, role: str) -> None:
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(f"{role}={key!r} is not a key of the probe batch; its keys are {list(batch)}")
    elif isinstance(batch, Sequence):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise ValueError(f"{role}={key!r} is not an index of the probe batch, which has {len(batch)} parts")
    else:
        raise ValueError(f"{role}={key!r} was given but the probe is a single tensor, not a batch with parts")


def describe_batch(batch: Any) -> str:
    """Shapes and dtypes of a batch's tensors, for error messages (``"tensor (256, 1, 8, 8) float32"``)."""
    parts = [f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}" for tensor in _tensors(batch)]
    return ("tensor " if isinstance(batch, Tensor) else "batch of ") + ", ".join(parts or ["no tensors"])


def check_not_meta(source: Any) -> None:
    """Refuse a probe whose tensors live on the ``meta`` device (shapes without data)."""
    if isinstance(source, (Tensor, Mapping, Sequence)) and not isinstance(source, str):
        if any(tensor.is_meta for tensor in _tensors(source)):
            raise ValueError(
                "the probe's tensors are on the meta device (shapes without data), so they cannot be run through"
                " the model: pass real samples (e.g. a slice of the validation data) as probe"
            )
