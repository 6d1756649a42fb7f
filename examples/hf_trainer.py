"""SVCCA with the HuggingFace ``Trainer``: :class:`~lightning_svcca.huggingface.SVCCATrainerCallback`.

The digits CNN of the other examples (a plain ``nn.Module``) is trained by ``transformers.Trainer``, with the
callback in ``callbacks=[...]``. Every epoch it compares each layer with the previous epoch; at the end, every
epoch with the final model. Scalars and heatmaps go to TensorBoard under ``<root>/runs/svcca`` (beside the
Trainer's own ``runs/`` folders), the history to ``<root>/svcca_history.csv``, and each Trainer checkpoint gets
the monitor's state (``svcca_state.pt``), so ``trainer.train(resume_from_checkpoint=True)`` continues the history.

Run::

    python examples/hf_trainer.py              # 10 epochs, about half a minute on two CPU cores
    tensorboard --logdir runs/hf_trainer/runs
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.nn import functional
from torch.utils.data import Dataset, TensorDataset
from transformers import Trainer, TrainingArguments

from lightning_svcca.huggingface import SVCCATrainerCallback

from common import HelpFormatter, add_run_arguments, run_example
from digits import DigitsNet, accuracy, load_data

LAYERS = ("relu1", "relu2", "relu3")


class AsDicts(Dataset):
    """A ``TensorDataset`` of (image, label) as the dicts the Trainer's collator expects."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        x, y = self.data[index]
        return {"x": x, "labels": y}


def cross_entropy(outputs: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """The Trainer's ``compute_loss_func`` for a model that returns logits."""
    return functional.cross_entropy(outputs, labels)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Fit with the Trainer and the callback; return accuracy and history."""
    train_data, test_data = load_data()
    epochs = 3 if args.quick else 10
    model = DigitsNet()
    callback = SVCCATrainerCallback(
        probe=test_data.tensors[0][: 200 if args.quick else 500], layers=LAYERS, reference=("previous", "final")
    )
    training_args = TrainingArguments(
        output_dir=str(args.root),
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        learning_rate=0.003,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,  # the model's forward(x) does not name "labels"; the loss function needs them
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=AsDicts(train_data),
        compute_loss_func=cross_entropy,
        callbacks=[callback],
    )
    trainer.train()
    result = {"accuracy": accuracy(model, test_data), "history": callback.history}
    print(format_summary(result, epochs))
    return result


def format_summary(result: dict[str, Any], epochs: int) -> str:
    """Per layer: SVCCA to the final model after each epoch."""
    history = result["history"]
    lines = [f"test accuracy {result['accuracy']:.3f}", f"SVCCA to the final model, epochs 0..{epochs}"]
    for layer in LAYERS:
        values = {r["epoch"]: r["value"] for r in history if r["layer"] == layer and r["reference"] == "final"}
        lines.append(f"{layer:<8}" + " ".join(f"{values[e]:.3f}" for e in sorted(values)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(
        parser,
        __file__,
        root_help="the Trainer's output_dir: history CSV here, TensorBoard events under runs/svcca",
        quick_help="3 epochs and a smaller probe (what the tests run)",
    )
    return run_example(train, parser.parse_args(argv))


if __name__ == "__main__":
    main()
