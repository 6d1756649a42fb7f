"""What a monitored layer's freeze covers: the parameters of the modules that ran in its part of the forward pass.

:func:`freeze_blocks` splits the modules that ran in the probe's forward pass into one :class:`Block` per monitored
layer: the modules that finished after the previous monitored layer and up to this one. Their parameters are what
freezing the layer turns off, their BatchNorm-style modules what it puts in eval mode, and the modules themselves
what a prefix cache skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["Block", "freeze_blocks"]


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
    modules = dict(model.named_modules())
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
