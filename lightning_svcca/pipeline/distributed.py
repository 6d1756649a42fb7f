"""Running the probe across processes: sharding, collectives (a Lightning strategy or torch.distributed), buffers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_svcca.pipeline.snapshot import Collective

__all__ = ["ProcessGroupCollective", "StrategyCollective", "broadcast_object", "buffers_from_rank_zero", "shard"]


class StrategyCollective:
    """Sums and row gathers over a Lightning strategy's process group."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self.rank = int(strategy.global_rank)
        self.world_size = int(strategy.world_size)

    def sum(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) through the strategy."""
        return self._strategy.reduce(tensor.contiguous(), reduce_op="sum")

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every process's rows in rank order; shorter shards are padded for the all-gather, then trimmed."""
        counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
        longest = int(max(count.item() for count in counts))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([part[: int(count.item())] for part, count in zip(gathered, counts, strict=True)])


class ProcessGroupCollective:
    """Sums and row gathers over the default ``torch.distributed`` process group (HF Trainer, Fabric, plain DDP)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sum(self, tensor: Tensor) -> Tensor:
        """All-reduce (sum) of a copy."""
        total = tensor.clone().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every process's rows in rank order (as :meth:`StrategyCollective.gather_rows`)."""
        return StrategyCollective.gather_rows(self, tensor)  # type: ignore[arg-type]


def broadcast_object(obj: Any) -> Any:
    """Rank zero's ``obj`` on every process of the default group (``obj`` itself without one)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@contextlib.contextmanager
def buffers_from_rank_zero(model: nn.Module, collective: Collective) -> Iterator[None]:
    """Under a sharded probe, use rank 0's buffers (BatchNorm statistics) for the probe, then restore our own."""
    if collective.world_size < 2 or not dist.is_available() or not dist.is_initialized():
        yield
        return
    buffers = list(model.buffers())
    saved = [buffer.detach().clone() for buffer in buffers]
    for buffer in buffers:
        dist.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def shard(size: int, collective: Collective) -> tuple[int, int]:
    """This process's contiguous range ``[start, stop)`` of ``size`` probe samples."""
    return size * collective.rank // collective.world_size, size * (collective.rank + 1) // collective.world_size
