r"""SVCCA in a plain ``torch.distributed`` loop: DDP or FSDP2 on CPU (gloo), hard freezing, DCP save and resume.

Run under ``torchrun``::

    torchrun --standalone --nproc_per_node 2 examples/distributed_loop.py --strategy fsdp2 --log-dir runs/dist
    torchrun --standalone --nproc_per_node 2 examples/distributed_loop.py --strategy ddp --log-dir runs/dist_ddp
    torchrun --standalone --nproc_per_node 1 examples/distributed_loop.py --log-dir runs/single   # unsharded
    torchrun --standalone --nproc_per_node 2 examples/distributed_loop.py --log-dir runs/resumed \
        --resume runs/dist/checkpoints/epoch-2                                           # FSDP2 from epoch 2

A small MLP learns a fixed synthetic task. Every process builds the same :class:`~lightning_svcca.SVCCAMonitor`
with ``runtime=Runtime.distributed(model)``: the probe is split over the processes and its statistics summed over
the default process group, so every process gets the values one process would; rank zero decides freezes (here a
schedule: ``act1`` after epoch 1, ``act2`` after epoch 2), every process applies them at the same step, and only
rank zero writes the history CSV and the snapshot folder under ``--log-dir``.

Each global batch of 64 samples is split in equal contiguous halves over 2 processes, and DDP and FSDP2 average
the gradients, so 1 and 2 processes train the same weights (up to float rounding).

* ``--strategy ddp``: the module is wrapped in ``DistributedDataParallel``; after a freeze ``after_freeze`` wraps it
  again (DDP's reducer expects a gradient for every parameter that required one when it was built).
* ``--strategy fsdp2``: each ``Linear`` is ``fully_shard``-ed, then the root. A frozen block gets no gradient and
  skips its reduce-scatter; the summary counts them per epoch.

Each epoch ends with a ``torch.distributed.checkpoint`` (DCP) folder ``--log-dir/checkpoints/epoch-N``: the model
and optimizer (one shard file per rank, as DCP writes), plus, from rank zero, ``svcca_monitor.pt`` (the monitor's
``state_dict()``, loadable with ``weights_only=True``) and ``loop.json``. Rank zero writes ``summary.json``: the
freezes, per epoch the reduce-scatters (FSDP2) or all-reduced gradient elements (DDP) and backward seconds, and a
hash of every full parameter after each epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel

from lightning_svcca import FreezePolicy, Runtime, Schedule, SVCCAMonitor

LAYERS = ("act1", "act2", "act3", "head")
SCHEDULE = {"act1": 1, "act2": 2}
GLOBAL_BATCH = 64
FEATURES, CLASSES = 32, 4


def synthetic_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a fixed random teacher network (the same on every process)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    return x, (torch.tanh(x) @ teacher).argmax(1)


def build_model(seed: int) -> nn.Sequential:
    """The MLP, seeded: every process starts from the same weights."""
    torch.manual_seed(seed)
    width = 64
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(FEATURES, width),
            act1=nn.ReLU(),
            fc2=nn.Linear(width, width),
            act2=nn.ReLU(),
            fc3=nn.Linear(width, width),
            act3=nn.ReLU(),
            head=nn.Linear(width, CLASSES),
        )
    )


class Counters:
    """Gradient communication and backward time per epoch (what a freeze saves)."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.epoch = 0

    def count(self, key: str, amount: float) -> None:
        self.epochs[self.epoch][key] += amount

    def count_reduce_scatters(self) -> None:
        """Count FSDP2's gradient reduce-scatters and their elements (FSDP2 calls ``dist.reduce_scatter_single``)."""
        original = dist.reduce_scatter_single

        def counted(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.count("reduce_scatters", 1)
            self.count("reduce_scatter_elements", input.numel())
            return original(output, input, *args, **kwargs)

        dist.reduce_scatter_single = counted

    def ddp_hook(self, state, bucket):  # noqa: ANN001, ANN201 (DDP checks the annotations: none, not strings)
        """DDP's all-reduce, counting buckets and gradient elements."""
        self.count("all_reduces", 1)
        self.count("all_reduce_elements", bucket.buffer().numel())
        return default_hooks.allreduce_hook(state, bucket)


class Trainable:
    """The model as the loop trains it: plain, in a DDP wrapper (rebuilt after freezes), or FSDP2-sharded."""

    def __init__(self, model: nn.Module, strategy: str, counters: Counters) -> None:
        self.strategy = strategy if dist.get_world_size() > 1 else "single"
        self.counters = counters
        if self.strategy == "fsdp2":
            for name in ("fc1", "fc2", "fc3", "head"):
                fully_shard(model.get_submodule(name))
            fully_shard(model)
            counters.count_reduce_scatters()
        self.model = model
        self.forward: nn.Module = model

    def wrap(self) -> None:
        """(Re)build the DDP wrapper around the trainable parameters: at the start and after each freeze."""
        if self.strategy == "ddp":
            self.forward = DistributedDataParallel(self.model)
            self.forward.register_comm_hook(None, self.counters.ddp_hook)


def full_parameter_hashes(model: nn.Module) -> dict[str, str]:
    """A hash of each parameter's full value (a collective under FSDP2: every process calls it)."""
    hashes = {}
    for name, parameter in model.named_parameters():
        value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
        hashes[name] = hashlib.sha256(value.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
    return hashes


def save_checkpoint(folder: Path, trainable: Trainable, optimizer: Any, monitor: SVCCAMonitor, at: dict) -> None:
    """A DCP folder with model and optimizer (every process), the monitor's state and the loop's place (rank 0)."""
    model_state, optimizer_state = get_state_dict(trainable.model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if dist.get_rank() == 0:
        torch.save(monitor.state_dict(), folder / "svcca_monitor.pt")
        (folder / "loop.json").write_text(json.dumps(at))
    dist.barrier()


def load_checkpoint(folder: Path, trainable: Trainable, optimizer: Any) -> dict:
    """Model and optimizer from a DCP folder (before any freeze is restored); the loop's place."""
    model_state, optimizer_state = get_state_dict(trainable.model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(trainable.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads((folder / "loop.json").read_text())


def train_epoch(trainable: Trainable, optimizer: Any, data: tuple, epoch: int, monitor: SVCCAMonitor) -> int:
    """One epoch over this process's contiguous share of each global batch; returns the steps taken."""
    x, y = data
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch))
    trainable.model.train()
    steps = 0
    for first in range(0, len(x), GLOBAL_BATCH):
        batch = order[first + rank * share : first + (rank + 1) * share]
        monitor.before_batch(epoch=epoch)
        loss = functional.cross_entropy(trainable.forward(x[batch]), y[batch])
        optimizer.zero_grad()
        started = time.perf_counter()
        loss.backward()
        trainable.counters.count("backward_s", time.perf_counter() - started)
        optimizer.step()
        steps += 1
    return steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, monitor, freeze and checkpoint; rank zero returns (and writes) the summary."""
    epochs = args.epochs or (4 if args.quick else 12)
    data = synthetic_data(512 if args.quick else 4096, seed=0)
    probe = synthetic_data(512, seed=1)[0]
    counters = Counters()
    trainable = Trainable(build_model(args.seed), args.strategy, counters)
    optimizer = torch.optim.SGD(trainable.model.parameters(), lr=0.05, momentum=0.9)
    start = {"epoch": 0, "step": 0}
    if args.resume is not None:
        start = load_checkpoint(args.resume, trainable, optimizer)
    monitor = SVCCAMonitor(
        trainable.model,
        probe=probe,
        layers=LAYERS,
        reference=("previous", "initial"),
        metrics=("svcca", "linear_cka"),
        freeze=FreezePolicy(Schedule(SCHEDULE)),
        log_dir=args.log_dir,
        runtime=Runtime.distributed(trainable.model, after_freeze=trainable.wrap, max_epochs=epochs),
    )
    if args.resume is not None:
        monitor.load_state_dict(torch.load(args.resume / "svcca_monitor.pt", weights_only=True))
        monitor.restore_freezes()  # requires_grad off on the (sharded) frozen parameters; DDP wraps the rest
    else:
        trainable.wrap()
    hashes = {}
    step = start["step"]
    with monitor:
        monitor.start(step=step)
        for epoch in range(start["epoch"], epochs):
            counters.epoch = epoch + 1
            step += train_epoch(trainable, optimizer, data, epoch, monitor)
            monitor.measure(epoch=epoch + 1, step=step)
            hashes[epoch + 1] = full_parameter_hashes(trainable.model)
            place = {"epoch": epoch + 1, "step": step}
            save_checkpoint(args.log_dir / "checkpoints" / f"epoch-{epoch + 1}", trainable, optimizer, monitor, place)
        monitor.finish(epoch=epochs, step=step)
    summary = {
        "world_size": dist.get_world_size(),
        "strategy": trainable.strategy,
        "frozen": dict(monitor.frozen),
        "requires_grad": {name: p.requires_grad for name, p in trainable.model.named_parameters()},
        "counters": {str(epoch): dict(values) for epoch, values in counters.epochs.items()},
        "hashes": {str(epoch): values for epoch, values in hashes.items()},
        "csv": monitor.outputs.csv_name,
    }
    if dist.get_rank() == 0:
        (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="fsdp2", help="with 2 or more processes")
    parser.add_argument("--log-dir", type=Path, required=True, help="history CSV, snapshots, checkpoints, summary")
    parser.add_argument("--quick", action="store_true", help="4 epochs of 512 samples (what the tests run)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 4 with --quick, else 12")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoints/epoch-N folder of an earlier run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        summary = run(args)
        if dist.get_rank() == 0:
            frozen = ", ".join(f"{layer} after epoch {epoch}" for layer, epoch in summary["frozen"].items())
            print(f"{summary['strategy']} on {summary['world_size']} process(es): froze {frozen or 'nothing'}")
        # every rank done before the teardown: a rank whose peer already exited can abort in gloo's teardown
        # ("terminate called without an active exception"), as seen once under load
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
