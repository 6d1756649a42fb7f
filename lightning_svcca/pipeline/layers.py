"""Which layers are monitored: the names a user gives (checked, with close matches for typos), or a default set.

:func:`resolve_layers` turns the ``layers`` argument into :class:`LayerSpec` s (a module name, which of its outputs
to analyse, how to reduce it, and its layout when the guess from the module type would be wrong);
:func:`default_layers` picks the repeated blocks of a model and the stems and heads around them;
:func:`format_layers` writes a choice in one line. Names may leave out the segments that wrappers (``torch.compile``,
Lightning Fabric, DDP, PEFT) add (:func:`find_module_name`), (:mod:`~lightning_svcca.pipeline.wrappers`).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_svcca.pipeline.heads import vocab_heads
from lightning_svcca.pipeline.reduction import LAYOUTS, REDUCTIONS, Layout, Reduction
from lightning_svcca.pipeline.wrappers import named_modules, shown_name, user_names

__all__ = [
    "LayerSpec",
    "default_layers",
    "find_module_name",
    "format_layers",
    "resolve_layers",
]

_DEFAULT_LAYER_TYPES = (nn.Linear, _ConvNd, nn.RNNBase, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: never a stem or head on their own: normalisation, lookup tables (a position table has no batch dimension)
_NOT_STEM_OR_HEAD = (nn.LayerNorm, _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.Embedding, nn.Dropout)
#: Modules that compute an affine map of their input when the probe runs (in eval mode): a stem built only of them
#: is a linear map of the model's input, which every reference matches (SVCCA is invariant to linear maps).
_AFFINE = (nn.Linear, _ConvNd, _BatchNorm, nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)
#: Where torch keeps its activation functions and pooling layers: the nonlinearities a stem ends with.
_NONLINEARITY_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.pooling")


@dataclass(frozen=True)
class LayerSpec:
    """A monitored layer and how to turn its output into a ``(datapoints, features)`` matrix.

    Attributes:
        name: the module's name in ``model.named_modules()``, without ``torch.compile``'s ``_orig_mod`` segments
            (:func:`~lightning_svcca.pipeline.wrappers.shown_name`).
        output: which part of a tuple, list, dict or dataclass output to use (an index, key or attribute name,
            or a path of them into nested outputs, e.g. ``(1, 0)`` for an LSTM's ``h_n``); ``None`` takes the
            tensor itself, the first element of a tuple or list, or a dict's / dataclass's ``last_hidden_state``
            (else its first tensor).
        reduction: ``"positions"``, ``"mean"`` or ``"flatten"`` (:mod:`lightning_svcca.pipeline.reduction`).
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


def default_layers(model: nn.Module, *, heads: bool = False) -> list[str]:
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
       ``feature_projection``, a ResNet's ``fc``, a classifier, a decoder's ``lm_head``. A stem before the
       first block that is only an affine map of the input (Linear, Conv, BatchNorm, Dropout: a ResNet's
       ``conv1``, a ViT's patch embedding) reads 1 against every reference whatever training does; it gives way
       to the first activation or pooling module after it, beside it (a ResNet's ``relu``: the first
       nonlinearity's output), or is left out when there is none (a ResNet applying ``torch.relu``, a ViT).
    3. **No repeated blocks** (a plain MLP or CNN such as ``nn.Sequential(Conv2d, ReLU, ..., Linear)``): every
       Linear, Conv1d/2d/3d, RNN/GRU/LSTM and Transformer encoder/decoder layer, outermost first (a module inside
       one already chosen, such as the projections inside a Transformer layer, is left out).
    4. **Vocabulary heads** (GPT-2's ``lm_head``, :func:`~lightning_svcca.pipeline.heads.vocab_heads`) are left
       out: their measurement would cost more than all the others together. ``heads=True`` keeps them.

    The names come in ``named_modules()`` order; layers that do not run in the probe's forward pass are dropped at
    the first probe. :func:`format_layers` writes the choice in one line.

    Example:
        >>> block = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.Sequential(block(), block(), block()), nn.Linear(4, 1))
        >>> default_layers(model)  # the Linear stem is an affine map of the input, with no activation beside it
        ['1.0', '1.1', '1.2', '2']
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Sequential(block(), block()), nn.Linear(4, 1))
        >>> default_layers(model)  # its activation stands in for it
        ['1', '2.0', '2.1', '3']
    """
    names = _default_candidates(model)
    return names if heads else [name for name in names if name not in vocab_heads(model, names)]


def _default_candidates(model: nn.Module) -> list[str]:
    """:func:`default_layers`' rules 1 to 3."""
    blocks = _repeated_blocks(model)
    if not blocks:
        return _every_layer(model)
    holders = {""} | {name for block in blocks for name in _ancestors(block)}
    chosen = set(blocks)
    for name, module in named_modules(model):
        if not name or name in holders or _parent(name) not in holders:
            continue
        if _is_lone_norm_or_table(module) or not any(True for _ in module.parameters()):
            continue
        chosen.add(name)
    modules = list(named_modules(model))
    first_block = min(index for index, (name, _) in enumerate(modules) if name in blocks)
    for index, (name, module) in enumerate(modules[:first_block]):
        if name in chosen and _is_affine(module):  # a linear stem: its first nonlinearity instead, if any
            chosen.discard(name)
            after = modules[index + 1 : first_block]
            chosen.update(next(([o] for o, sub in after if _parent(o) == _parent(name) and _is_nonlinearity(sub)), []))
    return [name for name, _ in modules if name in chosen]


def _is_affine(module: nn.Module) -> bool:
    """Whether every leaf of ``module`` is an affine map in eval mode (Linear, Conv, BatchNorm, Dropout, ...)."""
    leaves = [sub for sub in module.modules() if not any(True for _ in sub.children())]
    linear = any(isinstance(leaf, (nn.Linear, _ConvNd)) for leaf in leaves)
    return linear and all(isinstance(leaf, _AFFINE) for leaf in leaves)


def _is_nonlinearity(module: nn.Module) -> bool:
    """An activation function or pooling module (not attention)."""
    return type(module).__module__ in _NONLINEARITY_MODULES and not isinstance(module, nn.MultiheadAttention)


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
    for name, module in named_modules(model):
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
    for name, module in named_modules(model):
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


#: Name prefixes of wrappers, stripped from a name the model does not know (a name copied from a wrapped model).
_WRAPPER_PREFIXES = ("_orig_mod.", "_forward_module.", "module.", "base_model.model.")


def find_module_name(model: nn.Module, name: str) -> str:
    """The name in ``model.named_modules()``, without ``_orig_mod`` segments, of the module a user calls ``name``.

    ``name`` as it is (with or without ``torch.compile``'s ``_orig_mod`` segments: ``net.fc`` for
    ``net._orig_mod.fc``), else without wrapper segments (``conv1`` for ``_forward_module.conv1``, ``bert.pooler``
    for ``base_model.model.bert.pooler``), else with wrapper prefixes stripped from its front (a name copied from a
    wrapped model, given for the unwrapped one).

    Raises:
        ValueError: no module has that name; the message lists close matches among the user's names.
    """
    known = dict(named_modules(model))
    if name and shown_name(name) in known:
        return shown_name(name)
    unwrapped: dict[str, str] = {}
    for canonical, short in user_names(model).items():
        unwrapped.setdefault(short, shown_name(canonical))
    stripped = str(name)
    while stripped.startswith(_WRAPPER_PREFIXES):
        stripped = next(stripped[len(p) :] for p in _WRAPPER_PREFIXES if stripped.startswith(p))
    for candidate in (name, stripped):
        if candidate and candidate in unwrapped:
            return unwrapped[candidate]
    close = difflib.get_close_matches(str(name), [short for short in unwrapped if short], n=5, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else "; see [name for name, _ in model.named_modules()]"
    raise ValueError(f"layers names {name!r}, which is not a module of {type(model).__name__}{hint}")


def resolve_layers(
    model: nn.Module, layers: Sequence[str] | Mapping[str, Mapping[str, Any]] | None, reduction: Reduction
) -> list[LayerSpec]:
    """Turn the callback's ``layers`` argument into specs, failing early on names the model does not have.

    Names may leave out wrapper segments (:func:`find_module_name`); specs hold the names of
    ``model.named_modules()`` without ``_orig_mod`` segments.

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
    specs = []
    for name, layer_options in options.items():
        module_name = find_module_name(model, name)
        layer_options = dict(layer_options or {})
        unknown = set(layer_options) - {"output", "reduction", "layout"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)} for layer {name!r}; use output, reduction, layout")
        layer_options.setdefault("reduction", reduction)
        specs.append(LayerSpec(module_name, **layer_options))
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError(f"layers names a layer twice (with and without a wrapper's prefix): {list(options)}")
    return specs
