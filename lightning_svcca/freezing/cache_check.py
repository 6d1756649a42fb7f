"""The prefix cache's checks: whether a prefix may be cached at all, and whether a cached batch is served right.

:func:`prefix_refusal` is asked before a cache is built (a prefix with trainable parameters, active dropout or
batch statistics is never cached). :func:`verification_failure` judges a batch that ran in full although every
sample was cached: the recomputed boundary output must match the cached one, and the model's output must match a
replay of the same forward through the short cut (:func:`replay`: same random state, buffers restored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_svcca.pipeline.wrappers import modules_by_name

__all__ = ["prefix_refusal", "replay", "rng_state", "same_outputs", "verification_failure"]


def prefix_refusal(model: nn.Module, modules: Sequence[str], boundary: str) -> str | None:
    """Why the modules up to ``boundary`` cannot be cached, or ``None`` when they can (checked before caching).

    The prefix must be deterministic and fixed: no trainable parameter (one shared with a layer above would
    change), no active dropout, no normalisation by batch statistics.
    """
    named = modules_by_name(model)
    if boundary not in named:
        return f"the boundary layer {boundary!r} is not a module of the model"
    for name in (*modules, boundary):
        module = named.get(name)
        if module is None:
            return f"module {name!r} of the frozen prefix is not in the model"
        for parameter_name, parameter in module.named_parameters():
            if parameter.requires_grad:
                return f"parameter '{name}.{parameter_name}' in the frozen prefix still trains (shared above?)"
        for sub_name, sub in module.named_modules():
            full = f"{name}.{sub_name}" if sub_name else name
            if isinstance(sub, _DropoutNd) and sub.p > 0:
                return f"dropout {full!r} is in the frozen prefix, so its output is random in training"
            if isinstance(sub, (_BatchNorm, _InstanceNorm)) and not getattr(sub, "track_running_stats", False):
                return f"{full!r} normalises by batch statistics, so a sample's output depends on its batch"
    return None


def verification_failure(
    boundary: str, cached: Tensor, computed: Tensor, output: Any, replayed: Callable[[], tuple[Any, str | None]]
) -> str | None:
    """Why a batch served from the cache would have trained differently, or ``None`` when it checks out.

    Args:
        boundary: the boundary layer's name (for the reason).
        cached: the cached boundary outputs of the batch.
        computed: the boundary outputs this batch computed in full.
        output: the model's output computed in full.
        replayed: runs the same forward through the short cut: its output, or the error it raised.
    """
    if cached.shape != computed.shape or not _close(cached, computed):
        return (
            f"a cached output of {boundary!r} differs from the recomputed one (the prefix is not"
            " deterministic: dropout, random augmentation inside the model, or batch-dependent layers)"
        )
    short_cut_output, error = replayed()
    if error is not None:
        return f"the forward pass fails when the prefix is skipped ({error}); the frozen layers are not a prefix"
    if not same_outputs(output, short_cut_output):
        return (
            "the model's output changes when the prefix is skipped: something below the boundary layer"
            f" {boundary!r} reaches the layers above it (a skip connection?), so it is not a prefix"
        )
    return None


def replay(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    rng_before: list[Tensor] | None,
    short_cut: Callable[[], contextlib.AbstractContextManager[None]],
) -> tuple[Any, str | None]:
    """The same forward through the short cut: same random state, buffers (running statistics) restored.

    Args:
        module: the model.
        args: the forward's positional arguments.
        kwargs: the forward's keyword arguments.
        rng_before: the random state from before the full forward (:func:`rng_state`).
        short_cut: a context within which the model's forward skips the prefix.

    Returns:
        The replayed output and ``None``, or ``None`` and the error the replay raised.
    """
    rng_after = rng_state()
    # the replay updates copies of the buffers: the originals (saved for backward) must not change version
    originals = [(owner, dict(owner._buffers)) for owner in module.modules() if owner._buffers]
    for owner, buffers in originals:
        for name, buffer in buffers.items():
            if buffer is not None:
                owner._buffers[name] = buffer.detach().clone()
    try:
        with short_cut():
            _set_rng_state(rng_before)
            with torch.no_grad():
                return module(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - any failure of the short cut means "not a prefix"
        return None, f"{type(error).__name__}: {error}"
    finally:
        _set_rng_state(rng_after)
        for owner, buffers in originals:
            owner._buffers.update(buffers)


def same_outputs(a: Any, b: Any) -> bool:
    """Every tensor in two nested outputs (tensors, sequences, mappings) is close."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and _close(b.detach(), a.detach())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_outputs(a[key], b[key]) for key in a)
    return type(a) is type(b)


def rng_state() -> list[Tensor]:
    """The CPU random state, and every CUDA device's once CUDA is in use."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


def _set_rng_state(states: list[Tensor] | None) -> None:
    if not states:
        return
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state_all(states[1:])


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal for integers; within a dtype-dependent relative tolerance (scaled by ``b``'s largest value) for floats."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    precise = a.dtype in (torch.float32, torch.float64)
    scale = float(b.abs().max()) if b.numel() else 0.0
    rtol = 1e-4 if precise else 2e-2
    return torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-6))
