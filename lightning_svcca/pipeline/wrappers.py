"""Wrappers around the user's model: ``torch.compile``, Lightning Fabric, DDP / DataParallel, PEFT.

A wrapper adds a segment to every module name (``_orig_mod.``, ``_forward_module.``, ``module.``,
``base_model.model.``) but nothing to measure. :func:`unwrap_model` finds the user's model inside top-level
wrappers that only call it (so the monitor's names are the user's), :func:`user_names` gives every module's name
without wrapper segments (what :func:`~lightning_svcca.pipeline.layers.find_module_name` accepts), and
:func:`wrapper_precision` keeps what a Fabric wrapper does around forward passes (precision) for the probe.

A ``torch.compile`` d submodule (``self.net = torch.compile(Net())``) stays inside the model, so its
``_orig_mod.`` segment is in the middle of names. The monitor names modules and parameters without it
(:func:`shown_name`): :func:`named_modules` and :func:`named_parameters` are the model's under those names, and
:func:`modules_by_name` and :func:`parameters_by_name` find them under either name (a checkpoint written before
names dropped the segment still resolves).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = [
    "modules_by_name",
    "named_modules",
    "named_parameters",
    "parameters_by_name",
    "shown_name",
    "unwrap_model",
    "user_names",
    "wrapper_precision",
]

#: The segment ``torch.compile`` adds to the names of the modules inside a compiled module.
_COMPILED = "_orig_mod"

#: The wrapped attributes of wrappers whose ``forward`` only calls the wrapped model (with precision or syncing).
_TRANSPARENT = ("_orig_mod", "_forward_module", "module")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside ``torch.compile``, Lightning Fabric, ``DistributedDataParallel`` / ``DataParallel``.

    Why: these wrappers add nothing to measure, but put a prefix (``_orig_mod.``, ``_forward_module.``,
    ``module.``) before every name; the unwrapped model has the names its author wrote, and holds the same
    modules and weights. PEFT models are kept: their ``forward`` does more than call the base model.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        attributes = _wrapped_attributes(model)
        if not attributes or attributes[0] not in _TRANSPARENT:
            return model
        model = getattr(model, attributes[0])


def user_names(model: nn.Module) -> dict[str, str]:
    """Each module's name in ``named_modules()`` -> its name without wrapper segments (the name a user writes).

    Example:
        >>> wrapped = nn.Sequential(nn.DataParallel(nn.Sequential(nn.Linear(2, 2))))
        >>> user_names(wrapped)["0.module.0"]
        '0.0'
    """
    names = {}
    for name, _ in model.named_modules():
        module, kept = model, []
        for part in name.split(".") if name else []:
            if part not in _wrapped_attributes(module):
                kept.append(part)
            module = module._modules[part]  # type: ignore[assignment]
        names[name] = ".".join(kept)
    return names


def shown_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` segments: the name the monitor shows and stores.

    Example:
        >>> shown_name("net._orig_mod.layers.0._orig_mod.fc")
        'net.layers.0.fc'
    """
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` under :func:`shown_name` s: a compiled module is the module it wraps.

    Why: the compiled wrapper and its ``_orig_mod`` would share one name; the wrapped module holds the parameters
    and runs (with its hooks) whenever the wrapper is called, so it stands for both.
    """
    for name, module in model.named_modules():
        if not _is_compiled(module):
            yield shown_name(name), module


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` under :func:`shown_name` s."""
    for name, parameter in model.named_parameters():
        yield shown_name(name), parameter


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Each module under its :func:`shown_name` and under its name in ``named_modules()``.

    A compiled module's shown name finds the module it wraps (as in :func:`named_modules`).
    """
    return {**dict(model.named_modules()), **dict(named_modules(model))}


def parameters_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """Each parameter under its :func:`shown_name` and its name in ``named_parameters()``."""
    return {**dict(model.named_parameters()), **dict(named_parameters(model))}


def _is_compiled(module: nn.Module) -> bool:
    return _wrapped_attributes(module) == (_COMPILED,)


def _wrapped_attributes(module: nn.Module) -> tuple[str, ...]:
    """The attributes through which a wrapper holds the module it wraps (none for other modules).

    ``torch.compile``: ``_orig_mod``; Lightning Fabric: ``_forward_module`` (its ``_original_module`` is the same
    model, or the one inside a DDP ``_forward_module``); DDP and DataParallel: ``module``; PEFT: a ``PeftModel``'s
    ``base_model``, whose ``model`` is the user's.
    """
    kind, home = type(module).__name__, type(module).__module__
    if kind == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return ("_orig_mod",)
    if kind == "_FabricModule" and hasattr(module, "_forward_module"):
        return ("_forward_module", "_original_module")
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return ("module",)
    if home.startswith("peft.") and kind.startswith("PeftModel") and hasattr(module, "base_model"):
        return ("base_model",)
    if home.startswith("peft.tuners.") and isinstance(getattr(module, "model", None), nn.Module):
        return ("model",)
    return ()


def wrapper_precision(model: nn.Module) -> dict[str, Any]:
    """``forward_context`` and ``convert_input`` of a Lightning Fabric wrapper's precision (``{}`` without one).

    Why: the monitor runs the probe through the unwrapped model, so what ``_FabricModule.forward`` does (casting
    inputs to a ``*-true`` model's dtype, autocast under ``*-mixed``) must be done by the monitor's
    :class:`~lightning_svcca.monitoring.monitor.Runtime` instead.
    """
    while True:
        if type(model).__name__ == "_FabricModule" and hasattr(model, "_strategy"):
            precision = model._strategy.precision
            return {"forward_context": precision.forward_context, "convert_input": precision.convert_input}
        attributes = _wrapped_attributes(model)
        if not attributes or attributes[0] not in _TRANSPARENT:
            return {}
        model = getattr(model, attributes[0])
