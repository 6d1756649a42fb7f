"""Freezing under a Lightning strategy: whether ``requires_grad`` may change mid-run, and the DDP wrapper rebuild.

DDP's reducer fixes at wrap time which parameters it expects gradients for, so a hard freeze under DDP rebuilds the
wrapper (:func:`rebuild_ddp_wrapper`), or, where the training loop holds on to its wrapper (the HuggingFace Trainer),
the wrapper's reducer in place (:func:`rebuild_ddp_reducer`); sharding strategies flatten parameters at wrap time,
so they get soft freezing (:func:`is_hard_freeze_supported` says which).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_hard_freeze_supported", "rebuild_ddp_reducer", "rebuild_ddp_wrapper"]


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


def rebuild_ddp_reducer(wrapper: DistributedDataParallel, *, in_forward: bool = False) -> None:
    """Give an existing DistributedDataParallel wrapper a new reducer over its trainable parameters, in place.

    For loops that keep their own reference to the wrapper, so a new wrapper would never be used (the HuggingFace
    Trainer). Does what unpickling a DDP wrapper does (``DistributedDataParallel.__setstate__``): the old reducer's
    gradient hooks are removed, parameters that require gradients are bucketed again, and Python communication
    hooks registered on the wrapper are registered on the new reducer. Every process must call it at the same
    point, between iterations or, with ``in_forward``, inside the wrapper's forward (the new reducer then counts
    the iteration the wrapper already started).
    """
    if not any(parameter.requires_grad for parameter in wrapper.module.parameters()):
        raise ValueError("every parameter is frozen: DDP needs at least one trainable parameter")
    wrapper.reducer._remove_autograd_hooks()
    parameters, expect_sparse_gradient = wrapper._build_params_for_reducer()
    names = wrapper._build_debug_param_to_name_mapping(parameters)
    wrapper._ddp_init_helper(parameters, expect_sparse_gradient, names, wrapper.static_graph)
    if wrapper.static_graph:
        wrapper.reducer._set_static_graph()
        wrapper.logger._set_static_graph()
        wrapper._static_graph_delay_allreduce_enqueued = False
    for hook, state in wrapper._comm_hooks:
        dist._register_comm_hook(wrapper.reducer, state, hook)
    if in_forward and torch.is_grad_enabled() and wrapper.require_backward_grad_sync:
        wrapper.reducer.prepare_for_forward()
    gc.collect()


def is_hard_freeze_supported(strategy: Any) -> bool:
    """Whether ``requires_grad`` may change mid-run: the model is unwrapped (one device) or wrapped in DDP.

    Sharding wrappers (FSDP, DeepSpeed) flatten parameters into buffers fixed at wrap time.
    """
    wrapper = getattr(strategy, "model", None)
    return wrapper is getattr(strategy, "lightning_module", None) or isinstance(wrapper, DistributedDataParallel)
