"""What a monitored layer's freeze covers: the parameters of the modules that ran in its part of the forward pass.

:func:`freeze_blocks` splits the modules that ran in the probe's forward pass into one :class:`Block` per monitored
layer: the modules that finished after the previous monitored layer and up to this one. Their parameters are what
freezing the layer turns off, their BatchNorm-style modules what it puts in eval mode, and the modules themselves
what a prefix cache skips. :func:`freeze_message` says what freezing a block does: how many trainable tensors it
stops, and whether PEFT adapters are among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_svcca.pipeline.wrappers import modules_by_name, parameters_by_name

__all__ = ["Block", "adapter_parameters", "freeze_blocks", "freeze_message", "trainable_parameters"]

#: Name parts that mark a PEFT adapter's parameters when no module declares its ``adapter_layer_names``.
_ADAPTER_PREFIXES = ("lora_",)


@dataclass
class Block:
    """What freezing one monitored layer covers."""

    parameters: list[str] = field(default_factory=list)
    norm_modules: list[str] = field(default_factory=list)
    #: Every module that finished in this block's part of the forward pass (what a prefix cache skips).
    modules: list[str] = field(default_factory=list)
    #: The layer's position among the monitored layers, bottom-up.
    index: int = 0


def freeze_blocks(completion: Sequence[str], layers: Sequence[str], model: nn.Module) -> dict[str, Block]:
    """Split the modules that ran in the probe's forward pass into one block per monitored layer.

    A layer's block holds the parameters (and BatchNorm-style modules) of the modules that finished after the
    previous monitored layer and up to this one. A module that ran in several blocks (shared weights) belongs
    to the last, and one that also ran after the last monitored layer belongs to none: freezing a layer never
    freezes weights that a trained layer above still uses. Parameters that never ran are in no block.

    Args:
        completion: module names in the order they finished during the forward pass (repeats allowed).
        layers: monitored layers in forward order.
        model: the model the names refer to.
    """
    modules = modules_by_name(model)
    owner: dict[str, int] = {}
    index = 0
    for name in completion:
        owner[name] = index
        if index < len(layers) and name == layers[index]:
            index += 1
    # A parameter belongs to the last block any of its modules ran in; running after every monitored layer
    # (block index len(layers), "above the top") means it is never frozen.
    top = len(layers)
    parameter_block: dict[int, tuple[int, str]] = {}
    blocks = {layer: Block(index=index) for index, layer in enumerate(layers)}
    position = 0
    for name in completion:
        if position < len(layers) and name and name not in blocks[layers[position]].modules:
            blocks[layers[position]].modules.append(name)
        if position < len(layers) and name == layers[position]:
            position += 1
    for name, block_index in owner.items():
        module = modules.get(name)
        if module is None:
            continue
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full_name = f"{name}.{parameter_name}" if name else parameter_name
            known = parameter_block.get(id(parameter))
            parameter_block[id(parameter)] = (
                (max(block_index, known[0]), known[1]) if known else (block_index, full_name)
            )
        if block_index < top and _has_running_stats(module):
            blocks[layers[block_index]].norm_modules.append(name)
    for block_index, full_name in parameter_block.values():
        if block_index < top:
            blocks[layers[block_index]].parameters.append(full_name)
    return blocks


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, _InstanceNorm)) and bool(getattr(module, "track_running_stats", False))


def adapter_parameters(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The parameters among ``names`` that belong to PEFT adapters (LoRA and the other tuners).

    Found by duck typing: a PEFT tuner layer (``BaseTunerLayer``) lists its adapter submodules and parameters in
    ``adapter_layer_names`` (``("lora_A", "lora_B", ...)``), so a parameter whose dotted name has one of those parts
    is an adapter's; so is one with a part starting with ``lora_`` (without peft's classes at hand).
    """
    parts: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "adapter_layer_names", None)
        if isinstance(declared, (tuple, list)):
            parts.update(name for name in declared if isinstance(name, str))
    return [
        name for name in names if any(part in parts or part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))
    ]


def trainable_parameters(model: nn.Module, block: Block) -> list[str]:
    """The block's parameters that still train (``requires_grad``): PEFT and earlier freezes fix the others."""
    named = parameters_by_name(model)
    return [name for name in block.parameters if name in named and named[name].requires_grad]


def freeze_message(model: nn.Module, layer: str, block: Block, epoch: int, reason: str) -> str | None:
    """The log line of freezing ``layer``'s block now (before it is frozen), or ``None`` if nothing in it trains.

    Counts only the block's parameters that still train (PEFT and earlier freezes leave many fixed), and says
    when some of them are PEFT adapter weights: the freeze then stops the adapters of that layer training.
    """
    trainable = trainable_parameters(model, block)
    if not trainable:
        return None
    count = len(trainable)
    what = f"{count} trainable parameter tensor{'s' * (count != 1)}"
    adapters = adapter_parameters(model, trainable)
    if adapters:
        share = "all of them" if len(adapters) == count else f"{len(adapters)} of them"
        what += f", {share} PEFT adapter weights: its adapters stop training"
    return f"froze layer {layer!r} at epoch {epoch} ({what}): {reason}"
