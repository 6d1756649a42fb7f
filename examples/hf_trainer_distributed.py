r"""SVCCA with the HuggingFace ``Trainer`` on several processes: DDP on CPU (gloo), freezing, checkpoint and resume.

Run under ``torchrun``::

    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_distributed.py --log-dir runs/hf_ddp
    torchrun --standalone --nproc_per_node 1 examples/hf_trainer_distributed.py --log-dir runs/hf_single
    cp -r runs/hf_ddp runs/hf_resumed
    torchrun --standalone --nproc_per_node 2 examples/hf_trainer_distributed.py --log-dir runs/hf_resumed \
        --resume runs/hf_resumed/checkpoint-16                                      # from epoch 2 (--quick)

The MLP and synthetic task of ``examples/distributed_loop.py`` are trained by ``transformers.Trainer`` with
``TrainingArguments(ddp_backend="gloo", use_cpu=True)``; the Trainer wraps the model in
``DistributedDataParallel`` (here with ``ddp_find_unused_parameters=False``, DDP's fastest setting). Every process
runs the same :class:`~lightning_svcca.huggingface.SVCCATrainerCallback`: each measures its share of the probe and
the statistics are summed over the processes, so every process gets the values one process would; the freeze
schedule (``act1`` after epoch 1, ``act2`` after epoch 2) freezes the same layers at the same step everywhere, and
the callback rebuilds the Trainer's DDP reducer around the parameters still training. Only rank zero writes the
history CSV, the snapshot folder, the TensorBoard events and ``svcca_state.pt`` in each ``checkpoint-<step>``
folder (``save_strategy="epoch"``).

Each batch of 64 samples is split over the processes (``accelerator_config={"split_batches": True}``: every process
draws the same batches in the same seeded order, and takes its share of each), the loss is divided by the whole
batch's size (see :func:`cross_entropy`) and DDP averages the gradients, so 1 and 2 processes train the same
weights (up to float rounding). Rank zero writes
``summary.json``: the freezes, and per process the parameters' ``requires_grad``, a hash of every parameter after
each epoch, and the gradient elements DDP's reducer all-reduces per step at the end.

``--resume`` continues a run from one of its checkpoint folders (``--log-dir`` must be the run's folder: the
callback finds ``svcca_state.pt`` in ``<log-dir>/checkpoint-<step>``); the history then continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from lightning_svcca import FreezePolicy, Schedule
from lightning_svcca.huggingface import SVCCATrainerCallback

from distributed_loop import GLOBAL_BATCH, LAYERS, SCHEDULE, build_model, synthetic_data


class Samples(Dataset):
    """Inputs and labels as the dicts the Trainer's collator expects (``nn.Sequential`` takes ``input``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input": self.x[index], "labels": self.y[index]}


class ParameterRecord(TrainerCallback):
    """After each epoch (and the SVCCA callback's freezes): a hash of every parameter and its ``requires_grad``."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.requires_grad: dict[str, bool] = {}

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Record the model as it leaves the epoch."""
        self.hashes[str(round(state.epoch))] = {
            name: hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()[:16]
            for name, p in model.named_parameters()
        }
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """The Trainer's ``compute_loss_func`` for a model that returns logits: the mean over the whole batch.

    The Trainer counts the labels of the batch over all processes (``num_items_in_batch``) and multiplies the loss
    by the number of processes, which DDP's averaging undoes: a loss summed here and divided by that count gives
    every process the gradient one process would get.
    """
    if num_items_in_batch is None:
        return functional.cross_entropy(outputs, labels)
    return functional.cross_entropy(outputs, labels, reduction="sum") / num_items_in_batch


def reduced_elements(wrapper: Any) -> int | None:
    """Gradient elements DDP's reducer all-reduces per step (its buckets), or ``None`` without DDP."""
    if not isinstance(wrapper, DistributedDataParallel):
        return None
    return sum(bucket.buffer().numel() for bucket in wrapper.reducer._get_zeros_like_grad_buckets())


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Fit with the Trainer and the callback; every process returns its record, rank zero the gathered summary."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the Trainer starts the process group later
    epochs = 4 if args.quick else 12
    x, y = synthetic_data(512 if args.quick else 4096, seed=0)
    callback = SVCCATrainerCallback(
        probe=synthetic_data(512, seed=1)[0],
        layers=LAYERS,
        reference=("previous", "initial"),
        metrics=("svcca", "linear_cka"),
        freeze=FreezePolicy(Schedule(SCHEDULE)),
    )
    record = ParameterRecord()
    training_args = TrainingArguments(
        output_dir=str(args.log_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=GLOBAL_BATCH,
        accelerator_config={"split_batches": True},  # each batch of 64 split over the processes
        optim="sgd",
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="epoch",
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        use_cpu=True,
        seed=args.seed,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,  # the model's forward(input) does not name "labels"; the loss function needs them
    )
    trainer = Trainer(
        model=build_model(args.seed),
        args=training_args,
        train_dataset=Samples(x, y),
        compute_loss_func=cross_entropy,
        callbacks=[callback, record],
    )
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    mine = {
        "requires_grad": record.requires_grad,
        "hashes": record.hashes,
        "reduced_elements": reduced_elements(trainer.model_wrapped),
    }
    ranks = [mine] * world_size
    if world_size > 1:
        dist.all_gather_object(ranks, mine)
    return {"world_size": world_size, "frozen": dict(callback.monitor.frozen), "ranks": ranks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", type=Path, required=True, help="the Trainer's output_dir: checkpoints, CSV, ...")
    parser.add_argument("--quick", action="store_true", help="4 epochs of 512 samples (what the tests run)")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint-<step> folder of the --log-dir run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the data order")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = train(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (args.log_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        frozen = ", ".join(f"{layer} after epoch {epoch}" for layer, epoch in summary["frozen"].items())
        print(f"{summary['world_size']} process(es): froze {frozen or 'nothing'}")
    if dist.is_initialized():
        # the Trainer leaves its process group up: take it down on every rank together, or a rank whose peer
        # already exited can abort in gloo's teardown ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
