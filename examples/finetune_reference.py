"""Fine-tuning against a fixed reference: which layers move away from the pretrained model?

A small CNN is pretrained on the sklearn digits 0-4 and its weights saved with
``torch.save(model.state_dict(), path)``. The model is then fine-tuned on the digits 5-9 with a new output layer
(re-initialised, same shape) while :class:`~lightning_svcca.SVCCACallback` compares each layer, every epoch,
with three references: ``{"pretrained": path}`` (the checkpoint, a fixed model), ``"initial"`` (the model when
fine-tuning starts: the pretrained body with the new head) and ``"previous"`` (the epoch before).

The table shows, per layer (bottom-up), the SVCCA similarity to the pretrained model at the end of fine-tuning:
the lower layers, whose generic features serve both tasks, stay close to it; the upper ones, which have to
separate new classes, change (the general-to-specific picture of Yosinski et al. 2014, "How transferable are
features in deep neural networks?").

Run::

    python examples/finetune_reference.py            # well under a minute on two CPU cores
    python examples/finetune_reference.py --quick    # a few epochs (what the tests run)
    tensorboard --logdir runs/finetune_reference     # svcca/pretrained/<layer> curves, heatmaps

The checkpoint, TensorBoard events and ``svcca_history.csv`` go under ``--root``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback, compare_models
from lightning_svcca.output.reporting import HISTORY_FILE, history_matrix

from common import HelpFormatter, add_run_arguments, format_columns, run_example
from digits import DigitsCNN, accuracy, load_data

#: Monitored layers, bottom-up: each block after its non-linearity, then the (new) output layer.
LAYERS = ("relu1", "relu2", "relu3", "fc2")
#: Measures of the offline comparison: SVCCA as the callback computes it, held-out CCA (no small-probe bias),
#: orthogonal Procrustes and linear CKA.
OFFLINE_METRICS = ("svcca", "cca_heldout", "procrustes", "linear_cka")
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
TABLE_TITLE = "SVCCA similarity at the end of fine-tuning on digits 5-9, per layer (bottom-up)"


def only(data: TensorDataset, classes: tuple[int, ...]) -> TensorDataset:
    """The samples of ``data`` whose label is in ``classes``."""
    x, y = data.tensors
    keep = torch.isin(y, torch.tensor(classes))
    return TensorDataset(x[keep], y[keep])


def trainer(args: argparse.Namespace, epochs: int, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer."""
    return pl.Trainer(
        max_epochs=epochs,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        log_every_n_steps=5,
        **kwargs,
    )


def last_values(history: list[dict[str, Any]], reference: str, layers: list[str]) -> dict[str, float]:
    """Layer -> SVCCA to ``reference`` at the last epoch measured against it."""
    names, _, matrix = history_matrix(history, reference, "svcca", layers)
    result = {}
    for name, row in zip(names, matrix, strict=True):
        measured = row[~np.isnan(row)]
        if measured.size:
            result[name] = float(measured[-1])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Then: tensorboard --logdir <root>. Per-layer curves: svcca/pretrained/<layer>, svcca/initial/<layer>.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--pretrain-epochs", type=int, default=10, help="epochs of pretraining on digits 0-4")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of fine-tuning on digits 5-9")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of SGD with momentum 0.9, both phases")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument(
        "--probe-size", type=int, default=300, help="held-out digits 5-9 in the probe (there are about 300)"
    )
    add_run_arguments(
        parser,
        __file__,
        root_help="where the pretrained checkpoint, TensorBoard events and svcca_history.csv go",
        quick_help="a short run for the tests: 3 + 3 epochs (the table is printed all the same)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Pretrain, save, fine-tune with the callback, print the table, and return the results (for the tests).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``pretrained`` (layer -> SVCCA to the pretrained model at the end of fine-tuning), ``initial`` and
        ``previous`` (the same for those references), ``accuracy`` (on held-out digits 5-9 after fine-tuning),
        ``pretrain_accuracy`` (on held-out digits 0-4 after pretraining), ``layers`` (bottom-up),
        ``checkpoint``, ``history``, ``log_dir`` and ``csv``.
    """
    args = parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.finetune_epochs = 3, 3
    return run_example(run, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, on parsed arguments."""
    train, test = load_data(test_size=600)
    old_train, old_test = only(train, PRETRAIN_CLASSES), only(test, PRETRAIN_CLASSES)
    new_train, new_test = only(train, FINETUNE_CLASSES), only(test, FINETUNE_CLASSES)

    # 1. Pretrain on digits 0-4 and save the weights alone: a checkpoint path is a reference.
    model = DigitsCNN(lr=args.lr)
    trainer(args, args.pretrain_epochs, logger=False).fit(
        model, DataLoader(old_train, batch_size=args.batch_size, shuffle=True)
    )
    pretrain_accuracy = accuracy(model, old_test)
    args.root.mkdir(parents=True, exist_ok=True)
    checkpoint = args.root / f"pretrained_0-4_seed{args.seed}.pt"
    torch.save(model.state_dict(), checkpoint)

    # 2. A new head (same shape, fresh weights), then fine-tune everything on digits 5-9.
    model.fc2.reset_parameters()
    callback = SVCCACallback(
        probe=new_test.tensors[0][: args.probe_size],  # held-out digits 5-9
        layers=list(LAYERS),
        reference=[{"pretrained": str(checkpoint)}, "initial", "previous"],
    )
    fine_tuning = trainer(
        args, args.finetune_epochs, callbacks=[callback], logger=TensorBoardLogger(args.root, name=f"seed{args.seed}")
    )
    fine_tuning.fit(model, DataLoader(new_train, batch_size=args.batch_size, shuffle=True))

    new_accuracy = accuracy(model, new_test)
    layers = callback.layers
    columns = {
        "to pretrained": last_values(callback.history, "pretrained", layers),
        "to initial": last_values(callback.history, "initial", layers),
        "to previous": last_values(callback.history, "previous", layers),
        "noise floor": last_values(callback.history, "baseline", layers),
    }
    log_dir = Path(fine_tuning.log_dir)

    print(f"\npretrained on digits 0-4: test accuracy {pretrain_accuracy:.3f} on {len(old_test)} held-out digits")
    print(f"fine-tuned on digits 5-9: test accuracy {new_accuracy:.3f} on {len(new_test)} held-out digits\n")
    print(format_columns(TABLE_TITLE, layers, columns, label="layer"))
    print(
        f"(after {args.finetune_epochs} epochs; 'initial' is the pretrained body with the new head, so it differs"
        " from 'pretrained' only at fc2;\n 'noise floor': the same measure with the probe's datapoints shuffled,"
        " what unrelated representations would score)\n"
    )
    # 3. The same question without a training run: the pretrained and the fine-tuned model, compared offline on the
    #    probe (also `lightning-svcca compare` for two checkpoints), with held-out CCA and Procrustes beside SVCCA.
    pretrained = DigitsCNN(lr=args.lr)
    pretrained.load_state_dict(torch.load(checkpoint, weights_only=True))
    offline = compare_models(
        pretrained, model, new_test.tensors[0][: args.probe_size], layers=list(LAYERS), metrics=OFFLINE_METRICS
    )
    print("offline comparison, pretrained vs fine-tuned (compare_models):")
    print(offline.to_text())
    print()
    print(f"pretrained weights: {checkpoint}")
    print(f"TensorBoard: tensorboard --logdir {args.root}")
    print(f"history CSV: {log_dir / HISTORY_FILE}")
    return {
        "pretrained": columns["to pretrained"],
        "initial": columns["to initial"],
        "previous": columns["to previous"],
        "accuracy": new_accuracy,
        "pretrain_accuracy": pretrain_accuracy,
        "layers": layers,
        "checkpoint": checkpoint,
        "history": callback.history,
        "log_dir": log_dir,
        "csv": log_dir / HISTORY_FILE,
        "offline": offline,
    }


if __name__ == "__main__":
    main()
