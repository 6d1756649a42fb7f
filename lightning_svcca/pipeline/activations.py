"""Recording the activations of named layers during a probe pass, as ``(datapoints, features)`` matrices.

Forward hooks are registered only while an :class:`ActivationRecorder` is open, so training steps pay nothing.
Each recorded output is reduced at once to at most ``per_sample`` rows per probe sample:

* ``(N, C)``: one datapoint per sample.
* conv-like ``(N, C, *spatial)`` with ``reduction="positions"`` (default, the SVCCA paper's recipe): every
  spatial position is a datapoint, ``C`` features. When a sample has more positions than its share of
  ``max_datapoints``, it contributes ``per_sample`` of them: a fixed pseudo-random permutation of the positions
  (seeded by the layer name) read cyclically from offset ``sample_index * per_sample``, so neighbouring samples
  cover different positions and the choice never depends on chunking or on how a probe is sharded.
* sequence ``(N, T, C)``: every frame is a datapoint; padded frames (from the probe's mask or lengths) are
  dropped; a sample with more valid frames than its share contributes ``per_sample`` evenly spaced frames.
* ``reduction="mean"`` pools positions (masked mean over frames); ``"flatten"`` keeps ``(N, C * positions)``.

Which dimension holds the channels of a 3-D output is decided by the module type (Conv1d, BatchNorm1d and
pooling: ``(N, C, L)``; Linear, RNNs, Transformer layers, LayerNorm: ``(N, T, C)``, or ``(T, N, C)`` when
``batch_first`` is off). Other modules (ReLU, or a wrapper such as Hugging Face's wav2vec2 conv layer, which runs
Conv1d -> LayerNorm -> GELU) are matched by channel count: the channels of the last module with a known layout
that ran before their output (its ``out_channels``, ``out_features``, ``normalized_shape`` ...) find the channel
axis, so a Conv1d's ``(N, C, T)`` stays channels-first (time steps are datapoints) whatever module returns it.
When that does not decide, the last known layout is inherited, and a :class:`LayoutWarning` is issued if the
result has more features than that module has channels. ``LayerSpec.layout`` overrides the guess.

Padding: a sequence layer's valid frames come from the probe's lengths. Where a layer's time axis is shorter than
the probe's mask (a strided front end such as wav2vec2's feature encoder), the lengths are mapped through the
model's own length arithmetic (:meth:`ActivationRecorder.frame_lengths`): the ``output_lengths`` hook (by default
Hugging Face's ``_get_feat_extract_output_lengths``, looked up on the model and its submodules), else the
kernel/stride/padding arithmetic of the Conv1d and pooling layers that produced that frame count, else a
proportional rescale.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _MaxPoolNd,
)

from lightning_svcca.measures import SimilarityWarning

__all__ = [
    "ActivationRecorder",
    "LayerSpec",
    "LayoutWarning",
    "default_layers",
    "format_layers",
    "reduce_output",
    "resolve_layers",
]

Reduction = Literal["positions", "mean", "flatten"]
Layout = Literal["channels_first", "channels_last", "time_first"]
REDUCTIONS = ("positions", "mean", "flatten")
LAYOUTS = ("channels_first", "channels_last", "time_first")

_CHANNELS_FIRST_TYPES = (
    _ConvNd,
    _BatchNorm,
    _InstanceNorm,
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    nn.GroupNorm,
)
_DEFAULT_LAYER_TYPES = (nn.Linear, _ConvNd, nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: never a stem or head on their own: normalisation, lookup tables (a position table has no batch dimension)
_NOT_STEM_OR_HEAD = (nn.LayerNorm, _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.Embedding, nn.Dropout)
#: output length arithmetic of Hugging Face speech models (wav2vec2, HuBERT, WavLM, ...)
HF_LENGTH_HOOK = "_get_feat_extract_output_lengths"
_HIDDEN_STATE_NAMES = ("last_hidden_state", "hidden_states", "output", "logits")


class LayoutWarning(SimilarityWarning):
    """A layer's channel axis was guessed and the guess looks wrong: set its ``layout``."""


@dataclass(frozen=True)
class LayerSpec:
    """A monitored layer and how to turn its output into a ``(datapoints, features)`` matrix.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        output: which part of a tuple, list, dict or dataclass output to use (an index, key or attribute name,
            or a path of them into nested outputs, e.g. ``(1, 0)`` for an LSTM's ``h_n``); ``None`` takes the
            tensor itself, the first element of a tuple or list, or a dict's / dataclass's ``last_hidden_state``
            (else its first tensor).
        reduction: ``"positions"``, ``"mean"`` or ``"flatten"`` (module docstring).
        layout: ``"channels_first"``, ``"channels_last"`` or ``"time_first"`` for outputs with positions;
            ``None`` guesses from the module type.
    """

    name: str
    output: int | str | tuple[int | str, ...] | None = None
    reduction: Reduction = "positions"
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output, list):  # a path read from YAML
            object.__setattr__(self, "output", tuple(self.output))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction of layer {self.name!r} must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout of layer {self.name!r} must be one of {LAYOUTS}, got {self.layout!r}")


def default_layers(model: nn.Module) -> list[str]:
    """The layers monitored when none are named: repeated blocks, plus the stems and heads around them.

    The rule, in order:

    1. **Blocks.** The children of every ``nn.ModuleList`` / ``nn.Sequential`` that holds at least two blocks of
       one type, where a block is a module with submodules of its own, and every child but possibly the first
       (a stage's downsampling or normalising first block) has that type: BERT's ``encoder.layer.N``, wav2vec2's
       ``encoder.layers.N`` and ``feature_extractor.conv_layers.N``, a ResNet's ``layerK.M``. A container inside
       a chosen block is not searched (outermost blocks win).
    2. **Stems and heads.** Beside those blocks, every module with parameters whose parent contains a block
       (the model itself, ``bert``, ``encoder``, ...), except lone normalisation (any class named ``...Norm``),
       embedding-table and dropout layers: BERT's ``embeddings`` and ``pooler``, wav2vec2's
       ``feature_projection``, a ResNet's ``conv1`` and ``fc``, a classifier, a decoder's ``lm_head``.
    3. **No repeated blocks** (a plain MLP or CNN such as ``nn.Sequential(Conv2d, ReLU, ..., Linear)``): every
       Linear, Conv1d/2d/3d, RNN/GRU/LSTM and Transformer encoder/decoder layer, outermost first (a module inside
       one already chosen, such as the projections inside a Transformer layer, is left out).

    The names come in ``named_modules()`` order; layers that do not run in the probe's forward pass are dropped at
    the first probe. :func:`format_layers` writes the choice in one line.

    Example:
        >>> block = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.Sequential(block(), block(), block()), nn.Linear(4, 1))
        >>> default_layers(model)
        ['0', '1.0', '1.1', '1.2', '2']
    """
    blocks = _repeated_blocks(model)
    if not blocks:
        return _every_layer(model)
    holders = {""} | {name for block in blocks for name in _ancestors(block)}
    chosen = set(blocks)
    for name, module in model.named_modules():
        if not name or name in holders or _parent(name) not in holders:
            continue
        if _is_lone_norm_or_table(module) or not any(True for _ in module.parameters()):
            continue
        chosen.add(name)
    return [name for name, _ in model.named_modules() if name in chosen]


def _is_lone_norm_or_table(module: nn.Module) -> bool:
    """Normalisation (also custom ones named ``...Norm``, such as RMSNorm), lookup tables and dropout."""
    return isinstance(module, _NOT_STEM_OR_HEAD) or type(module).__name__.endswith("Norm")


def format_layers(names: Sequence[str]) -> str:
    """The monitored layers in one line, numbered runs folded: ``encoder.layer.{0..11}``.

    Example:
        >>> format_layers(["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler"])
        '5 layers: embeddings, encoder.layer.{0..2}, pooler'
    """
    parts: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if len(run) > 1:
            parts.append(f"{run[0][0]}{{{run[0][1]}..{run[-1][1]}}}")
        elif run:
            parts.append(f"{run[0][0]}{run[0][1]}")
        run.clear()

    for name in names:
        match = re.fullmatch(r"(.*?)(\d+)", name)
        if match is None:
            flush()
            parts.append(name)
            continue
        stem, number = match.group(1), int(match.group(2))
        if run and (run[-1][0] != stem or run[-1][1] + 1 != number):
            flush()
        run.append((stem, number))
    flush()
    count = len(names)
    return f"{count} layer{'s' if count != 1 else ''}: {', '.join(parts)}"


def _repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of rule 1 of :func:`default_layers`."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not _is_block_container(module):
            continue
        if any(name == block or name.startswith(block + ".") for block in blocks):
            continue
        prefix = f"{name}." if name else ""
        blocks.extend(prefix + child for child, _ in module.named_children())
    return blocks


def _is_block_container(container: nn.Module) -> bool:
    children = list(container.children())
    if len(children) < 2:
        return False
    if not all(any(True for _ in child.children()) and any(True for _ in child.parameters()) for child in children):
        return False
    block_type, count = Counter(type(child) for child in children[1:]).most_common(1)[0]
    return count == len(children) - 1 and count + (type(children[0]) is block_type) >= 2


def _every_layer(model: nn.Module) -> list[str]:
    """Rule 3 of :func:`default_layers`."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, _DEFAULT_LAYER_TYPES):
            continue
        if any(name.startswith(parent + ".") for parent in chosen):
            continue
        chosen.append(name)
    return chosen


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]`` (the root ``""`` not included)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def resolve_layers(
    model: nn.Module, layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None, reduction: Reduction
) -> list[LayerSpec]:
    """Turn the callback's ``layers`` argument into specs, failing early on names the model does not have.

    Args:
        model: the model whose ``named_modules()`` define the names.
        layers: names, or ``{name: {"output": ..., "reduction": ..., "layout": ...}}``, or ``None`` for
            :func:`default_layers`.
        reduction: the reduction of layers that do not set their own.

    Raises:
        ValueError: an unknown name (with the closest matches), a duplicate, no layers at all, or an unknown
            option.
    """
    if layers is None:
        names = default_layers(model)
        if not names:
            raise ValueError(
                "found no Linear, Conv, RNN or Transformer layers to monitor by default; name them with layers=[...]"
            )
        return [LayerSpec(name, reduction=reduction) for name in names]
    if isinstance(layers, str):
        layers = [layers]
    options = dict(layers) if isinstance(layers, Mapping) else {name: {} for name in layers}
    if not isinstance(layers, Mapping) and len(options) != len(layers):
        raise ValueError(f"layers names a layer twice: {list(layers)}")
    if not options:
        raise ValueError("layers is empty: name at least one module, or pass layers=None for the default set")
    known = dict(model.named_modules())
    specs = []
    for name, layer_options in options.items():
        if name not in known or not name:
            close = difflib.get_close_matches(str(name), [key for key in known if key], n=5, cutoff=0.5)
            hint = f"; did you mean {close}?" if close else "; see [name for name, _ in model.named_modules()]"
            raise ValueError(f"layers names {name!r}, which is not a module of {type(model).__name__}{hint}")
        layer_options = dict(layer_options or {})
        unknown = set(layer_options) - {"output", "reduction", "layout"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)} for layer {name!r}; use output, reduction, layout")
        layer_options.setdefault("reduction", reduction)
        specs.append(LayerSpec(name, **layer_options))
    return specs


class OutputSelectionError(TypeError):
    """A layer's ``output`` selection does not lead to a tensor (raised inside the probe's forward pass)."""


def select_output(output: Any, which: int | str | Sequence[int | str] | None, layer: str) -> Tensor:
    """The tensor to analyse among a module's outputs (see :attr:`LayerSpec.output`).

    ``which`` may be a path into nested outputs: ``(1, 0)`` takes element 0 of element 1 (an LSTM's ``h_n``).
    """
    if isinstance(which, (tuple, list)):
        if not which:
            raise ValueError(f"layer {layer!r}: output=() selects nothing; give an index, a key or a path of them")
        selected = output
        for depth, step in enumerate(which):
            path = tuple(which[: depth + 1])
            if isinstance(selected, Tensor):
                raise ValueError(
                    f"layer {layer!r}: output={tuple(which)!r} goes deeper than its outputs: {path[:-1]!r} is"
                    f" already a tensor of shape {tuple(selected.shape)}; use output={path[:-1]!r}"
                )
            selected = _select_one(selected, step, layer, path)
        return _checked(selected, tuple(which), layer)
    if which is None:
        if isinstance(output, Tensor):
            return _checked(output, which, layer)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return _checked(output[0], which, layer)
        parts = _named_parts(output)
        for key in _HIDDEN_STATE_NAMES:
            if isinstance(parts.get(key), Tensor):
                return _checked(parts[key], which, layer)
        for value in parts.values():
            if isinstance(value, Tensor):
                return _checked(value, which, layer)
        raise OutputSelectionError(
            f"layer {layer!r} returned {type(output).__name__} without a tensor to analyse; choose one with"
            " layers={name: {'output': <index, key or path such as (1, 0)>}}"
        )
    return _checked(_select_one(output, which, layer, which), which, layer)


def _select_one(output: Any, which: int | str, layer: str, shown: Any) -> Any:
    """``output[which]`` (or an attribute), with an error naming the layer and what is available."""
    try:
        return output[which] if isinstance(output, (tuple, list, Mapping)) else getattr(output, str(which))
    except (IndexError, KeyError, AttributeError, TypeError) as err:
        available = list(_named_parts(output)) or (len(output) if isinstance(output, (tuple, list)) else None)
        raise ValueError(
            f"layer {layer!r}: output={shown!r} does not select anything from its {type(output).__name__} output"
            f" (available: {available})"
        ) from err


def _checked(selected: Any, which: Any, layer: str) -> Tensor:
    """The selected output must be a tensor with a sample dimension."""
    if isinstance(selected, (tuple, list)) and selected and isinstance(selected[0], Tensor):
        path = (*which, 0) if isinstance(which, tuple) else (0,) if which is None else (which, 0)
        raise OutputSelectionError(
            f"layer {layer!r}: output={which!r} selects a {type(selected).__name__} of {len(selected)} tensors, not"
            f" a tensor; select inside it with a path, e.g. output={path!r}"
        )
    if not isinstance(selected, Tensor):
        raise OutputSelectionError(
            f"layer {layer!r}: output={which!r} selects a {type(selected).__name__}, not a tensor"
        )
    if selected.ndim == 0:
        raise ValueError(
            f"layer {layer!r}: output={which!r} is a 0-dim tensor (a scalar, e.g. a loss); a monitored output needs"
            " one row per probe sample, shape (N, ...): monitor another layer or select another output"
        )
    return selected


def reduce_output(
    output: Tensor,
    *,
    layout: Layout,
    reduction: Reduction,
    sample_ids: Tensor,
    per_sample: int,
    seed: int,
    lengths: Tensor | None = None,
    mask_frames: int | None = None,
    length_map: Callable[[Tensor, int], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Reduce one chunk of a layer's output to ``(rows, features)``, and the probe sample of each row.

    Args:
        output: the layer's output for the chunk, batch first (or time first with ``layout="time_first"``).
        layout: where the channels are (module docstring).
        reduction: ``"positions"``, ``"mean"`` or ``"flatten"``.
        sample_ids: ``(N,)`` global probe indices of the chunk's samples.
        per_sample: at most this many positions or frames per sample.
        seed: seeds the layer's fixed permutation of positions.
        lengths: ``(N,)`` valid frames per sample of a sequence output, or ``None`` (all frames valid).
        mask_frames: length of the probe's padding mask; when a layer's time axis differs (a strided front
            end) and no ``length_map`` is given, lengths are rescaled by ``T / mask_frames``.
        length_map: ``length_map(lengths, T)`` -> valid frames of each sample in an output with ``T`` frames
            (:meth:`ActivationRecorder.frame_lengths`, the model's exact length arithmetic).

    Returns:
        ``(rows, features)`` and ``(rows,)`` sample indices.
    """
    if layout == "time_first" and output.ndim == 3:
        output = output.transpose(0, 1)
        layout = "channels_last"
    n = output.shape[0]
    if n != sample_ids.shape[0]:
        raise ValueError(
            f"the output has {n} entries along its batch dimension but the chunk holds {sample_ids.shape[0]}"
            " samples; choose another output or set the layer's layout (e.g. 'time_first' for an RNN's h_n)"
        )
    if output.ndim == 2:
        return output, sample_ids
    if output.ndim == 1:
        return output[:, None], sample_ids
    if reduction == "flatten":
        return output.reshape(n, -1), sample_ids
    if layout == "channels_first" and output.ndim == 3 and lengths is not None:
        output, layout = output.transpose(1, 2), "channels_last"  # (N, C, L) of a masked sequence: frames
    if layout == "channels_first":
        flat = output.reshape(n, output.shape[1], -1)
        if reduction == "mean":
            return flat.mean(dim=2), sample_ids
        return _sample_positions(flat, sample_ids, per_sample, seed)
    sequence = output.reshape(n, -1, output.shape[-1])
    if lengths is not None and length_map is not None:
        valid = length_map(lengths, sequence.shape[1]).to(sequence.device).clamp(0, sequence.shape[1])
    else:
        valid = _valid_lengths(lengths, sequence.shape[1], mask_frames)
    if reduction == "mean":
        if valid is None:
            return sequence.mean(dim=1), sample_ids
        keep = torch.arange(sequence.shape[1], device=sequence.device)[None, :] < valid[:, None]
        total = torch.where(keep[..., None], sequence, sequence.new_zeros(())).sum(dim=1)
        return total / valid.clamp_min(1)[:, None].to(total.dtype), sample_ids
    return _sample_frames(sequence, sample_ids, per_sample, valid)


class ActivationRecorder:
    """Context manager recording reduced outputs of named modules, and the order modules finish in.

    Open it around :func:`lightning_svcca.pipeline.probe.run_probe` with ``before_chunk=recorder.start_chunk``. Hooks go
    on the monitored modules and on every module with parameters or running statistics (to learn the forward
    order that freezing follows); all are removed on exit.

    Attributes:
        activations: layer name -> ``(rows, features)`` reduced outputs of the samples seen, on their device.
        sample_ids: layer name -> ``(rows,)`` probe sample index of each row.
        input_eps: layer name -> machine epsilon of the dtype the layer produced (rounding level of its data).
        order: monitored layers in the order they first finished: bottom-up.
        completion: every hooked module, in the order it finished during the first chunk.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Iterable[LayerSpec],
        *,
        per_sample: int,
        mask_frames: int | None = None,
        output_lengths: Callable[[Tensor], Tensor] | None = None,
        keep_means: bool = False,
        record_only: Iterable[str] | None = None,
        strides: Mapping[int, tuple[int, nn.Module]] | None = None,
    ) -> None:
        """Prepare hooks (registered on ``__enter__``).

        Args:
            model: the model to watch.
            specs: the monitored layers.
            per_sample: at most this many positions or frames per probe sample.
            mask_frames: length ``T`` of the probe's ``(N, T)`` padding mask (``None``: lengths, or no mask).
            output_lengths: ``output_lengths(lengths)`` maps a sample's valid input length to the valid frames of
                the model's downsampled sequence (the encoder's frames); default: the model's (or a
                submodule's) ``_get_feat_extract_output_lengths``, as Hugging Face's wav2vec2, HuBERT and WavLM
                define it. :meth:`frame_lengths` uses it for every layer with that many frames.
            keep_means: also keep each sample's output averaged over all its positions or valid frames
            (:attr:`means`: one datapoint per sample, for cross-layer maps between layers of different sizes).
            record_only: record these monitored layers only (the others are still hooked, for :attr:`completion`
            and :attr:`order`); ``None``: all of them.
            strides: :attr:`strides` known from an earlier pass (for a pass that skips the strided layers).
        """
        self.model = model
        self.output_lengths = output_lengths if output_lengths is not None else find_length_hook(model)
        self.specs = {spec.name: spec for spec in specs}
        self.recorded = set(self.specs) if record_only is None else set(record_only) & set(self.specs)
        self.per_sample = max(1, per_sample)
        self.mask_frames = mask_frames
        self.activations: dict[str, Tensor] = {}
        self.sample_ids: dict[str, Tensor] = {}
        #: layer -> ``(samples, features)`` means over every position or valid frame (with ``keep_means``).
        self.means: dict[str, Tensor] = {}
        self.keep_means = keep_means
        self._mean_chunks: dict[str, list[Tensor]] = {name: [] for name in self.specs}
        self.input_eps: dict[str, float] = {}
        self.layouts: dict[str, Layout] = {}
        self.output_ndim: dict[str, int] = {}
        self.order: list[str] = []
        self.completion: list[str] = []
        self._chunks: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in self.specs}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._chunk_ids: Tensor | None = None
        self._chunk_lengths: Tensor | None = None
        self._first_chunk = True
        self._seen_in_chunk: set[str] = set()
        self._layout: Layout = "channels_last"
        self._channels: int | None = None
        #: Output frames -> (input frames, the strided Conv1d / pooling layer), as seen in the forward pass.
        self.strides: dict[int, tuple[int, nn.Module]] = dict(strides or {})
        self._hook_frames: int | None = None
        self._warned_layouts: set[str] = set()

    def frame_lengths(self, lengths: Tensor, frames: int) -> Tensor:
        """Valid frames per sample of an output with ``frames`` time steps, from the probe's lengths.

        Exact where the model says how it downsamples: ``frames`` equal to the mask's length (no downsampling),
        the ``output_lengths`` hook's frame count, or a chain of strided Conv1d / pooling layers seen in the
        forward pass (``floor((L + 2p - d(k - 1) - 1) / s) + 1`` per layer). Otherwise the lengths are rescaled by
        ``frames / mask_frames``, rounding up.
        """
        mask_frames = self.mask_frames
        if mask_frames is None or frames == mask_frames:
            return lengths.clamp(0, frames)
        if self.output_lengths is not None:
            if self._hook_frames is None:
                self._hook_frames = int(self.output_lengths(torch.tensor([mask_frames])).reshape(-1)[0])
            if self._hook_frames == frames:
                return self.output_lengths(lengths).to(lengths.device, torch.long).clamp(0, frames)
        chain, at = [], frames
        while at in self.strides and at != mask_frames and len(chain) < 64:
            before, module = self.strides[at]
            chain.append(module)
            at = before
        if at != mask_frames:
            return _valid_lengths(lengths, frames, mask_frames)  # type: ignore[return-value]
        for module in reversed(chain):
            lengths = _strided_lengths(module, lengths)
        return lengths.clamp(0, frames)

    def start_chunk(self, first: int, lengths: Tensor | None, size: int, device: torch.device) -> None:
        """Tell the hooks which probe samples the next forward pass holds."""
        if self._chunk_ids is not None:
            self._first_chunk = False
        self._chunk_ids = torch.arange(first, first + size, device=device)
        self._chunk_lengths = None if lengths is None else lengths.to(device)
        self._seen_in_chunk.clear()
        self._layout = "channels_last"
        self._channels = None

    def __enter__(self) -> ActivationRecorder:
        for name, module in self.model.named_modules():
            watched = name in self.specs
            if watched or _has_state(module) or isinstance(module, _CHANNELS_FIRST_TYPES):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, chunks in self._chunks.items():
            if chunks:
                self.activations[name] = torch.cat([rows for rows, _ in chunks])
                self.sample_ids[name] = torch.cat([ids for _, ids in chunks])
        for name, chunks in self._mean_chunks.items():
            if chunks:
                self.means[name] = torch.cat(chunks)
        self._chunks = {name: [] for name in self.specs}
        self._mean_chunks = {name: [] for name in self.specs}

    def _hook(self, name: str):  # noqa: ANN202 - a torch forward hook
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._first_chunk:
                self.completion.append(name)
            spec = self.specs.get(name)
            own = _own_layout(module)
            self._note_stride(module, args, output)
            if spec is not None and name in self.recorded:
                self._record(spec, own, output)
            if own is not None:
                self._layout = own
                self._channels = _channel_count(module) or self._channels

        return hook

    def _note_stride(self, module: nn.Module, args: Any, output: Any) -> None:
        """Remember which strided Conv1d / pooling layer turned how many frames into how many."""
        if not isinstance(module, (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d)) or not isinstance(output, Tensor):
            return
        source = args[0] if args and isinstance(args[0], Tensor) else None
        if source is None or source.ndim != output.ndim or output.ndim < 2:
            return
        before, after = int(source.shape[-1]), int(output.shape[-1])
        if before != after and after not in self.strides:
            self.strides[after] = (before, module)

    def _guess_layout(self, name: str, tensor: Tensor) -> Layout:
        """Layout of a module that has none of its own: where the last known module's channel count sits."""
        layout, channels = self._layout, self._channels
        if tensor.ndim < 3 or channels is None:
            return layout
        first, last = tensor.shape[1] == channels, tensor.shape[-1] == channels
        if first and not last:
            return "channels_first"
        if last and not first:
            return "time_first" if layout == "time_first" else "channels_last"
        features = tensor.shape[1] if layout == "channels_first" else tensor.shape[-1]
        if features > channels and name not in self._warned_layouts:
            self._warned_layouts.add(name)
            warnings.warn(
                f"layer {name!r}: its output {tuple(tensor.shape)} is read as {layout} with {features} features,"
                f" but the module before it has {channels} channels, so it may keep more directions than the layer"
                f" has channels; set layers={{{name!r}: {{'layout': 'channels_first' or 'channels_last'}}}}",
                LayoutWarning,
                stacklevel=3,
            )
        return layout

    def _record(self, spec: LayerSpec, own: Layout | None, output: Any) -> None:
        if self._chunk_ids is None:
            raise RuntimeError("ActivationRecorder.start_chunk must be called before each forward pass")
        if spec.name in self._seen_in_chunk:
            return  # a module called twice in one pass: its first call is the representation
        self._seen_in_chunk.add(spec.name)
        if spec.name not in self.order:
            self.order.append(spec.name)
        tensor = select_output(output, spec.output, spec.name).detach()
        layout = spec.layout or own or self._guess_layout(spec.name, tensor)
        self.layouts[spec.name] = layout
        self.output_ndim[spec.name] = tensor.ndim
        self.input_eps[spec.name] = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
        try:
            rows, ids = reduce_output(
                tensor,
                layout=layout,
                reduction=spec.reduction,
                sample_ids=self._chunk_ids,
                per_sample=self.per_sample,
                seed=layer_seed(spec.name),
                lengths=self._chunk_lengths,
                mask_frames=self.mask_frames,
                length_map=self.frame_lengths,
            )
        except ValueError as error:
            raise ValueError(f"layer {spec.name!r}: {error}") from error
        storage = torch.float64 if rows.dtype == torch.float64 else torch.float32
        self._chunks[spec.name].append((rows.to(storage), ids))
        if self.keep_means:
            means = rows if tensor.ndim <= 2 else self._means(tensor, layout)
            self._mean_chunks[spec.name].append(means.to(storage))

    def _means(self, tensor: Tensor, layout: Layout) -> Tensor:
        """Each sample's output averaged over all its positions or valid frames: ``(samples, features)``."""
        means, _ = reduce_output(
            tensor,
            layout=layout,
            reduction="mean",
            sample_ids=self._chunk_ids,
            per_sample=1,
            seed=0,
            lengths=self._chunk_lengths,
            mask_frames=self.mask_frames,
            length_map=self.frame_lengths,
        )
        return means


def layer_seed(name: str) -> int:
    """A seed derived from a layer's name, stable across processes and runs (unlike ``hash``)."""
    return zlib.crc32(name.encode())


def _own_layout(module: nn.Module) -> Layout | None:
    if isinstance(module, _CHANNELS_FIRST_TYPES):
        return "channels_first"
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return "channels_last" if module.batch_first else "time_first"
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        # these keep batch_first only on their attention module
        return "channels_last" if module.self_attn.batch_first else "time_first"
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
        return "channels_last"
    return None


def find_length_hook(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The model's (or a submodule's) ``_get_feat_extract_output_lengths``: Hugging Face's length arithmetic."""
    for module in model.modules():
        hook = getattr(module, HF_LENGTH_HOOK, None)
        if callable(hook):
            return hook
    return None


def _channel_count(module: nn.Module) -> int | None:
    """How many channels a module with a known layout produces (``None`` when it keeps its input's)."""
    if isinstance(module, _ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1] if module.normalized_shape else None
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.RNNBase):
        return module.hidden_size * (2 if module.bidirectional else 1)
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return module.linear2.out_features
    return None


def _strided_lengths(module: nn.Module, lengths: Tensor) -> Tensor:
    """Valid output frames of a Conv1d or 1-d pooling layer: ``floor((L + 2p - d(k - 1) - 1) / s) + 1``."""

    def first(value: Any) -> int:
        return int(value[0] if isinstance(value, (tuple, list)) else value)

    padding = getattr(module, "padding", 0)
    padding = 0 if isinstance(padding, str) else first(padding)  # "same" keeps the length: never strided here
    kernel, stride = first(module.kernel_size), first(module.stride or module.kernel_size)
    dilation = first(getattr(module, "dilation", 1))
    span = lengths + 2 * padding - dilation * (kernel - 1) - 1
    return torch.div(span, stride, rounding_mode="floor").add(1).clamp_min(0)


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _named_parts(output: Any) -> dict[str, Any]:
    if isinstance(output, Mapping):
        return dict(output)
    if is_dataclass(output) and not isinstance(output, type):
        return {field.name: getattr(output, field.name) for field in fields(output)}
    return {}


_PERMUTATIONS: dict[tuple[int, int, str], Tensor] = {}


def _permutation(seed: int, size: int, device: torch.device) -> Tensor:
    key = (seed, size, str(device))
    if key not in _PERMUTATIONS:
        generator = torch.Generator().manual_seed(seed)
        _PERMUTATIONS[key] = torch.randperm(size, generator=generator).to(device)
    return _PERMUTATIONS[key]


def _sample_positions(flat: Tensor, sample_ids: Tensor, per_sample: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(N, C, P)`` -> rows of ``per_sample`` positions per sample (all of them when there are few)."""
    n, channels, positions = flat.shape
    if per_sample >= positions:
        rows = flat.permute(0, 2, 1).reshape(n * positions, channels)
        return rows, sample_ids.repeat_interleave(positions)
    offsets = (sample_ids[:, None] * per_sample + torch.arange(per_sample, device=flat.device)) % positions
    index = _permutation(seed, positions, flat.device)[offsets]
    picked = flat.gather(2, index[:, None, :].expand(n, channels, per_sample))
    return picked.permute(0, 2, 1).reshape(n * per_sample, channels), sample_ids.repeat_interleave(per_sample)


def _valid_lengths(lengths: Tensor | None, frames: int, mask_frames: int | None) -> Tensor | None:
    if lengths is None:
        return None
    if mask_frames is not None and mask_frames != frames:
        lengths = torch.ceil(lengths.to(torch.float64) * frames / mask_frames).to(torch.long)
    return lengths.clamp(0, frames)


def _sample_frames(
    sequence: Tensor, sample_ids: Tensor, per_sample: int, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(N, T, C)`` -> rows of the valid frames, evenly thinned to ``per_sample`` per sample."""
    n, frames, channels = sequence.shape
    if valid is None and per_sample >= frames:
        return sequence.reshape(n * frames, channels), sample_ids.repeat_interleave(frames)
    valid = torch.full((n,), frames, device=sequence.device) if valid is None else valid
    taken = min(per_sample, frames)
    slots = torch.arange(taken, device=sequence.device)[None, :]
    spread = torch.floor((slots + 0.5) * valid[:, None].to(torch.float64) / taken).to(torch.long)
    index = torch.where(valid[:, None] > taken, spread, slots).clamp(max=frames - 1)
    keep = slots < valid[:, None].clamp(max=taken)
    picked = sequence.gather(1, index[:, :, None].expand(n, taken, channels))
    return picked[keep], sample_ids[:, None].expand(n, taken)[keep]


def probe_share(max_datapoints: int, probe_size: int) -> int:
    """Positions or frames each probe sample may contribute under the ``max_datapoints`` cap (at least one)."""
    return max(1, math.floor(max_datapoints / probe_size))
