"""Recording the activations of named layers during a probe pass, as ``(datapoints, features)`` matrices.

Forward hooks are registered only while an :class:`ActivationRecorder` is open, so training steps pay nothing.
Each recorded output is reduced at once to at most ``per_sample`` rows per probe sample
(:func:`~lightning_svcca.pipeline.reduction.reduce_output`).

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

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
from lightning_svcca.pipeline.layers import LayerSpec
from lightning_svcca.pipeline.reduction import Layout, layer_seed, reduce_output, rescaled_lengths, select_output
from lightning_svcca.pipeline.wrappers import named_modules

__all__ = ["HF_LENGTH_HOOK", "ActivationRecorder", "LayoutWarning", "find_length_hook"]

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
#: output length arithmetic of Hugging Face speech models (wav2vec2, HuBERT, WavLM, ...)
HF_LENGTH_HOOK = "_get_feat_extract_output_lengths"


class LayoutWarning(SimilarityWarning):
    """A layer's channel axis was guessed and the guess looks wrong: set its ``layout``."""


class ActivationRecorder:
    """Context manager recording reduced outputs of named modules, and the order modules finish in.

    Open it around :func:`lightning_svcca.pipeline.probe.run_probe` with ``before_chunk=recorder.start_chunk``. Hooks go
    on the monitored modules and on every module with parameters or running statistics (to learn the forward
    order that freezing follows); all are removed on exit.

    Attributes:
        activations: layer name -> ``(rows, features)`` reduced outputs of the samples seen, on their device.
        sample_ids: layer name -> ``(rows,)`` probe sample index of each row.
        input_eps: layer name -> machine epsilon of the dtype the layer produced (rounding level of its data).
        chunks_run: probe chunks (forward passes) started so far.
        chunks_recorded: layer name -> chunks in which it was recorded (fewer than ``chunks_run``: it ran on
            part of the probe only, and its rows cannot be paired sample by sample with another pass's).
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
        # without a padding mask no frame lengths are mapped: the model is not searched for its hook
        found = output_lengths is not None or mask_frames is None
        self.output_lengths = output_lengths if found else find_length_hook(model)
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
        self.chunks_run = 0
        self.chunks_recorded: dict[str, int] = {}
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
        #: The probe's mean loss in a pass of the monitored model (``None``: none could be read from its output).
        self.probe_loss: float | None = None

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
            return rescaled_lengths(lengths, frames, mask_frames)  # type: ignore[return-value]
        for module in reversed(chain):
            lengths = _strided_lengths(module, lengths)
        return lengths.clamp(0, frames)

    def start_chunk(self, first: int, lengths: Tensor | None, size: int, device: torch.device) -> None:
        """Tell the hooks which probe samples the next forward pass holds."""
        if self._chunk_ids is not None:
            self._first_chunk = False
        self.chunks_run += 1
        self._chunk_ids = torch.arange(first, first + size, device=device)
        self._chunk_lengths = None if lengths is None else lengths.to(device)
        self._seen_in_chunk.clear()
        self._layout = "channels_last"
        self._channels = None

    def __enter__(self) -> ActivationRecorder:
        for name, module in named_modules(self.model):
            watched = name in self.specs
            if watched or _has_state(module) or isinstance(module, _CHANNELS_FIRST_TYPES):
                self._handles.append(module.register_forward_hook(self._hook(name, module)))
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

    def _hook(self, name: str, module: nn.Module):  # noqa: ANN202 - a torch forward hook
        """The forward hook of ``module``; what its type says is looked up once, not at every call."""
        spec = self.specs.get(name) if name in self.recorded else None
        own = _own_layout(module)
        channels = _channel_count(module) if own is not None else None
        strided = isinstance(module, (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._first_chunk:
                self.completion.append(name)
            if strided:
                self._note_stride(module, args, output)
            if spec is not None:
                self._record(spec, own, output)
            if own is not None:
                self._layout = own
                self._channels = channels or self._channels

        return hook

    def _note_stride(self, module: nn.Module, args: Any, output: Any) -> None:
        """Remember which strided Conv1d / pooling layer turned how many frames into how many."""
        if not isinstance(output, Tensor):
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
        self.chunks_recorded[spec.name] = self.chunks_recorded.get(spec.name, 0) + 1
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
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.to(torch.float32)  # stored in float32 unless float64 (a same-dtype .to is not free)
        self._chunks[spec.name].append((rows, ids))
        if self.keep_means:
            means = rows if tensor.ndim <= 2 else self._means(tensor, layout)
            self._mean_chunks[spec.name].append(means.to(rows.dtype))

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
