"""The monitor's :class:`~lightning_svcca.monitoring.monitor.Runtime` for a plain ``torch.distributed`` loop.

Under ``torchrun`` every process builds the same :class:`~lightning_svcca.SVCCAMonitor` with
``runtime=Runtime.distributed(model)``: each process runs its share of the probe and the statistics are summed
over the default process group (every process gets the single-process values), rank zero decides freezes and
broadcasts them so every process freezes the same layers at the same step, and only rank zero writes files
(history CSV, snapshot folder, writers). The model may be plain (one process), wrapped in DDP (pass the module
inside) or sharded with FSDP2 (pass the ``fully_shard``-ed root); see ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import nn

from lightning_svcca.freezing.sharded import resharding
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.pipeline.distributed import ProcessGroupCollective, broadcast_object
from lightning_svcca.pipeline.snapshot import LocalCollective

__all__ = ["distributed_runtime"]


def distributed_runtime(model: nn.Module, *, after_freeze: Callable[[], None] | None = None, **fields: Any) -> Runtime:
    """The runtime of a loop on the default process group (one process when none is initialised).

    Args:
        model: the monitored model: the module inside a DDP wrapper, or the ``fully_shard``-ed root under FSDP2
            (the probe then reshards it after each pass, so freezes turn off ``requires_grad`` on the shards and
            FSDP2 skips their gradients and reduce-scatters).
        after_freeze: called on every process after a freeze. DDP needs it: its reducer expects a gradient for
            every parameter that required one when it was built, so wrap the module in a new
            ``DistributedDataParallel`` there and train through that. FSDP2 needs nothing.
        **fields: the other :class:`Runtime` fields (``max_epochs``, ``forward_context``, ``logger``, ...).

    Raises:
        ValueError: ``fields`` sets what the process group decides (``collective``, ``is_global_zero``,
            ``broadcast``).
    """
    taken = sorted({"collective", "is_global_zero", "broadcast"} & set(fields))
    if taken:
        raise ValueError(f"Runtime.distributed takes {taken} from the process group; build a Runtime to set them")
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    return Runtime(
        collective=ProcessGroupCollective() if world_size > 1 else LocalCollective(),
        is_global_zero=not initialized or dist.get_rank() == 0,
        broadcast=broadcast_object,
        after_freeze=after_freeze,
        **{**fields, "forward_context": resharding(model, fields.get("forward_context"))},
    )
