"""Freeze training: stop computing gradients for layers whose representation has converged, bottom-up.

A :class:`FreezePolicy` decides from the history which layers have converged; the freezer turns a decision into
parameters with ``requires_grad=False`` (and keeps it across checkpoints); the prefix cache serves the frozen
prefix's outputs instead of recomputing them; the frozen prefix lets a measurement reuse what is known of it.

The parts, one module each: :mod:`~lightning_svcca.freezing.policy` (when: :class:`FreezePolicy`, its order and
bounds), :mod:`~lightning_svcca.freezing.rules` (which layers are ready: :class:`Movement`, :class:`Convergence`,
:class:`LinearSchedule`, :class:`Schedule`), :mod:`~lightning_svcca.freezing.task_signal` (the loss's say:
:class:`TaskGate`),
:mod:`~lightning_svcca.freezing.blocks` (what a layer's freeze covers: :func:`freeze_blocks`),
:mod:`~lightning_svcca.freezing.freezer` (applying freezes: :class:`Freezer`),
:mod:`~lightning_svcca.freezing.strategies` (DDP and sharded strategies),
:mod:`~lightning_svcca.freezing.prefix_cache` (:class:`PrefixCache`, with its keys, store, passes and checks in the
``cache_*`` modules) and :mod:`~lightning_svcca.freezing.frozen_prefix` (measuring past the frozen prefix).
The names below are imported on first use (PEP 562), so the policy loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_svcca._lazy import lazy_attributes

if TYPE_CHECKING:
    from lightning_svcca.freezing.blocks import Block, freeze_blocks
    from lightning_svcca.freezing.cache_keys import IndexedDataset
    from lightning_svcca.freezing.freezer import Freezer
    from lightning_svcca.freezing.frozen_prefix import FrozenPrefix
    from lightning_svcca.freezing.policy import FreezeDecision, FreezeOutcome, FreezePolicy, PrefixCacheOptions
    from lightning_svcca.freezing.prefix_cache import PrefixCache, PrefixCacheWarning
    from lightning_svcca.freezing.rules import (
        Convergence,
        Evidence,
        FreezeRule,
        LinearSchedule,
        Movement,
        Readiness,
        Schedule,
    )
    from lightning_svcca.freezing.strategies import is_hard_freeze_supported, rebuild_ddp_wrapper
    from lightning_svcca.freezing.task_signal import TaskGate

#: Public name -> the module of this package that defines it.
_MODULES = {
    "Block": "blocks",
    "Convergence": "rules",
    "Evidence": "rules",
    "FreezeDecision": "policy",
    "FreezeOutcome": "policy",
    "FreezePolicy": "policy",
    "FreezeRule": "rules",
    "LinearSchedule": "rules",
    "Movement": "rules",
    "PrefixCacheOptions": "policy",
    "Readiness": "rules",
    "Schedule": "rules",
    "TaskGate": "task_signal",
    "Freezer": "freezer",
    "FrozenPrefix": "frozen_prefix",
    "IndexedDataset": "cache_keys",
    "PrefixCache": "prefix_cache",
    "PrefixCacheWarning": "prefix_cache",
    "freeze_blocks": "blocks",
    "is_hard_freeze_supported": "strategies",
    "rebuild_ddp_wrapper": "strategies",
}

__all__ = [
    "Block",
    "Convergence",
    "Evidence",
    "FreezeDecision",
    "FreezeOutcome",
    "FreezePolicy",
    "FreezeRule",
    "Freezer",
    "FrozenPrefix",
    "IndexedDataset",
    "LinearSchedule",
    "Movement",
    "PrefixCache",
    "PrefixCacheOptions",
    "PrefixCacheWarning",
    "Readiness",
    "Schedule",
    "TaskGate",
    "freeze_blocks",
    "is_hard_freeze_supported",
    "rebuild_ddp_wrapper",
]


__getattr__, __dir__ = lazy_attributes(__name__, _MODULES, globals())
