"""Freezing sharded models: what per-parameter sharding (FSDP2) allows, and what flat-buffer sharding does not.

``torch.distributed.fsdp.fully_shard`` (FSDP2) keeps each parameter a ``DTensor`` shard registered on its module,
and copies ``requires_grad`` from that shard to the all-gathered parameter before each forward pass. A freeze that
turns ``requires_grad`` off on the shards is therefore a hard freeze: the frozen parameters get no gradient, a
``fully_shard``-ed block whose parameters are all frozen skips its reduce-scatter, and the optimizer skips them.

One catch: after a forward pass, the root module's parameters stay all-gathered (FSDP2 keeps them for the backward
pass), so a freeze applied then would change the all-gathered copies and be undone at the next forward. The probe
runs in :func:`resharding`, which reshards every ``fully_shard``-ed module after each probe pass: freezes always
land on the shards.

Lightning's ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy`` flatten parameters into buffers fixed when the
model is wrapped; there the callback "soft freezes" (:func:`soft_freeze_message` says what that saves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

__all__ = ["fsdp2_modules", "resharding", "soft_freeze_message"]

ContextFactory = Callable[[], contextlib.AbstractContextManager]


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The ``fully_shard``-ed modules of ``model`` (itself included), outermost first; ``[]`` without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def resharding(model: nn.Module, inner: ContextFactory | None = None) -> ContextFactory | None:
    """A probe forward context that reshards ``model``'s FSDP2 modules after each pass (``inner`` around it).

    Returns ``inner`` unchanged when ``model`` has no ``fully_shard``-ed module.
    """
    modules = fsdp2_modules(model)
    if not modules:
        return inner

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        try:
            with inner() if inner is not None else contextlib.nullcontext():
                yield
        finally:
            for module in modules:
                module.reshard()  # type: ignore[operator]

    return context


def soft_freeze_message(strategy_name: str) -> str:
    """The warning for a strategy that shards parameters into flat buffers: what a soft freeze saves, and not."""
    return (
        f"freezing on {strategy_name} is a soft freeze: the strategy flattens parameters into buffers fixed at wrap"
        " time, so requires_grad cannot change mid-run. Kept: the frozen parameters' values (their gradients are"
        " dropped before each optimizer step, so the optimizer, momentum and weight decay leave them alone). Not"
        " saved: no compute is saved; the backward pass still computes their gradients, the strategy still"
        " reduce-scatters or all-reduces them, and their optimizer state keeps its memory. For a hard freeze that"
        " skips all of that, shard with FSDP2 (torch.distributed.fsdp.fully_shard: Lightning's"
        " ModelParallelStrategy, or a plain torch.distributed loop with Runtime.distributed), or train on one"
        " device or with DDP"
    )
