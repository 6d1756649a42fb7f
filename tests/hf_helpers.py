"""The HuggingFace ``Trainer`` as the tests run it: dict batches in dataset order, SGD at a constant rate.

Import it after ``pytest.importorskip("transformers")``: it needs ``transformers``, an optional test dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional
from torch.utils.data import Dataset, SequentialSampler


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every loop of the adapter tests uses, so their histories can agree value for value."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


class Dicts(Dataset):
    """A dataset of ``(x, y)`` pairs as the dicts the Trainer passes to a model: ``{"x": x, "labels": y}``."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = self.data[index]
        return {"x": x, "labels": y}


class InOrderTrainer(transformers.Trainer):
    """The Trainer with the batches in dataset order, as the other loops see them."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


def hf_trainer(
    root: str | Path, model: nn.Module, train: Dataset, callback: Any, epochs: int, **overrides: Any
) -> transformers.Trainer:
    """A quiet CPU Trainer writing into ``root``: batches of 64 in order, :func:`sgd` at a constant rate, no
    gradient clipping, cross-entropy on the model's output; ``overrides`` are ``TrainingArguments``."""
    options = dict(
        output_dir=str(root),
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        max_grad_norm=0.0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        remove_unused_columns=False,
    )
    args = transformers.TrainingArguments(**{**options, **overrides})
    optimizer = sgd(model)
    return InOrderTrainer(
        model=model,
        args=args,
        train_dataset=Dicts(train),
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: functional.cross_entropy(outputs, labels),
        callbacks=[callback],
    )
