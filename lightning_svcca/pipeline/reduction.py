"""How a layer's output becomes a ``(datapoints, features)`` matrix: which tensor, which rows, how many.

:func:`select_output` picks the tensor to analyse among a module's outputs (an index, key or attribute path into
tuples, dicts and dataclasses). :func:`reduce_output` turns one chunk of it into rows, at most ``per_sample`` per
probe sample (:func:`probe_share`: each sample's share of the per-layer cap ``max_datapoints``):

* ``(N, C)``: one datapoint per sample.
* conv-like ``(N, C, *spatial)`` with ``reduction="positions"`` (default, the SVCCA paper's recipe): every
  spatial position is a datapoint, ``C`` features. When a sample has more positions than its share of
  ``max_datapoints``, it contributes ``per_sample`` of them: a fixed pseudo-random permutation of the positions
  (seeded by the layer name, :func:`layer_seed`) read cyclically from offset ``sample_index * per_sample``, so
  neighbouring samples cover different positions and the choice never depends on chunking or on how a probe is
  sharded.
* sequence ``(N, T, C)``: every frame is a datapoint; padded frames (from the probe's mask or lengths) are
  dropped; a sample with more valid frames than its share contributes ``per_sample`` evenly spaced frames.
* ``reduction="mean"`` pools positions (masked mean over frames); ``"flatten"`` keeps ``(N, C * positions)``.

Where the channels of an output with positions sit is its ``layout``, which the recorder
(:mod:`lightning_svcca.pipeline.recording`) decides before reducing.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "REDUCTIONS",
    "Layout",
    "OutputSelectionError",
    "Reduction",
    "layer_seed",
    "probe_share",
    "reduce_output",
    "rescaled_lengths",
    "select_output",
]

Reduction = Literal["positions", "mean", "flatten"]
Layout = Literal["channels_first", "channels_last", "time_first"]
REDUCTIONS = ("positions", "mean", "flatten")
LAYOUTS = ("channels_first", "channels_last", "time_first")

_HIDDEN_STATE_NAMES = ("last_hidden_state", "hidden_states", "output", "logits")


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
        layout: where the channels are (:mod:`lightning_svcca.pipeline.recording` decides it).
        reduction: ``"positions"``, ``"mean"`` or ``"flatten"``.
        sample_ids: ``(N,)`` global probe indices of the chunk's samples.
        per_sample: at most this many positions or frames per sample.
        seed: seeds the layer's fixed permutation of positions.
        lengths: ``(N,)`` valid frames per sample of a sequence output, or ``None`` (all frames valid).
        mask_frames: length of the probe's padding mask; when a layer's time axis differs (a strided front
            end) and no ``length_map`` is given, lengths are rescaled by ``T / mask_frames``.
        length_map: ``length_map(lengths, T)`` -> valid frames of each sample in an output with ``T`` frames
            (:meth:`~lightning_svcca.pipeline.recording.ActivationRecorder.frame_lengths`, the model's exact
            length arithmetic).

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
        valid = rescaled_lengths(lengths, sequence.shape[1], mask_frames)
    if reduction == "mean":
        if valid is None:
            return sequence.mean(dim=1), sample_ids
        keep = torch.arange(sequence.shape[1], device=sequence.device)[None, :] < valid[:, None]
        total = torch.where(keep[..., None], sequence, sequence.new_zeros(())).sum(dim=1)
        return total / valid.clamp_min(1)[:, None].to(total.dtype), sample_ids
    return _sample_frames(sequence, sample_ids, per_sample, valid)


def probe_share(max_datapoints: int, probe_size: int) -> int:
    """Positions or frames each probe sample may contribute under the ``max_datapoints`` cap (at least one)."""
    return max(1, math.floor(max_datapoints / probe_size))


def layer_seed(name: str) -> int:
    """A seed derived from a layer's name, stable across processes and runs (unlike ``hash``)."""
    return zlib.crc32(name.encode())


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


def rescaled_lengths(lengths: Tensor | None, frames: int, mask_frames: int | None) -> Tensor | None:
    """Valid frames per sample of an output with ``frames`` time steps, by rescaling the probe's lengths.

    The fallback where the model's length arithmetic is unknown: ``ceil(lengths * frames / mask_frames)``.
    """
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
