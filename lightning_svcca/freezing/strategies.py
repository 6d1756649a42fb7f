"""Freezing under a Lightning strategy: whether ``requires_grad`` may change mid-run, and the DDP wrapper rebuild.

DDP's reducer fixes at wrap time which parameters it expects gradients for, so a hard freeze under DDP rebuilds the
wrapper (:func:`rebuild_ddp_wrapper`); sharding strategies flatten parameters at wrap time, so they get soft freezing
(:func:`is_hard_freeze_supported` says which).
"""

from __future__ import annotations

import gc
from typing import Any

from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_hard_freeze_supported", "rebuild_ddp_wrapper"]


def rebuild_ddp_wrapper(strategy: Any) -> bool:
    """Re-wrap the model in a fresh DistributedDataParallel after ``requires_grad`` changed.

    DDP's reducer fixes the set of parameters it expects gradients for when it is built; a parameter that stops
    requiring gradients later makes the next backward fail ("Expected to have finished reduction in the prior
    iteration"). A new wrapper tracks only the trainable parameters. Every process must call this at the same
    point: building DDP broadcasts the module's state from rank 0.

    Returns:
        Whether a wrapper was rebuilt (``False`` when the strategy does not wrap the model in DDP).
    """
    wrapper = getattr(strategy, "model", None)
    if not isinstance(wrapper, DistributedDataParallel) or not hasattr(strategy, "_setup_model"):
        return False
    module = wrapper.module
    if not any(parameter.requires_grad for parameter in module.parameters()):
        raise ValueError("every parameter is frozen: DDP needs at least one trainable parameter")
    reducer = getattr(wrapper, "reducer", None)
    if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
        reducer._remove_autograd_hooks()
    strategy.model = strategy._setup_model(module)
    if hasattr(strategy, "_register_ddp_hooks"):
        strategy._register_ddp_hooks()
    del wrapper, reducer
    gc.collect()
    return True


def is_hard_freeze_supported(strategy: Any) -> bool:
    """Whether ``requires_grad`` may change mid-run: the model is unwrapped (one device) or wrapped in DDP.

    Sharding wrappers (FSDP, DeepSpeed) flatten parameters into buffers fixed at wrap time.
    """
    wrapper = getattr(strategy, "model", None)
    return wrapper is getattr(strategy, "lightning_module", None) or isinstance(wrapper, DistributedDataParallel)
