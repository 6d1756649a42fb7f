"""Transfer learning with a ResNet: how far does each stage move from the pretrained model during fine-tuning?

A small ResNet of BasicBlock stages (``layer1`` .. ``layer4``, as in He et al. 2016, written here rather than taken
from torchvision) is pretrained on the sklearn digits 0-4, upsampled to 32x32. Its output layer is then
re-initialised and the whole network fine-tuned on the digits 5-9 while :class:`~lightning_svcca.SVCCACallback`
compares each stage, every epoch, with the pretrained model (``{"pretrained": model}``: a frozen copy).

The table shows, per stage, the SVCCA similarity to the pretrained model after the first epoch and at the end of
fine-tuning: early stages, whose generic edge and stroke features serve both tasks, stay close to the pretrained
model; the last stage, which has to separate new classes, moves furthest (Yosinski et al. 2014; Raghu et al. 2017,
SVCCA, section 5; Neyshabur et al. 2020, "What is being transferred in transfer learning?").

Run::

    python examples/transfer_resnet.py            # about 1-2 minutes on two CPU cores
    python examples/transfer_resnet.py --quick    # a short run (what the tests run)
    tensorboard --logdir runs/transfer_resnet     # svcca/pretrained/<stage> curves, heatmaps

TensorBoard events and ``svcca_history.csv`` go under ``--root``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_svcca import SVCCACallback
from lightning_svcca.output.reporting import HISTORY_FILE

from common import HelpFormatter, add_run_arguments, format_columns, run_example
from digits import accuracy, load_data
from finetune_reference import FINETUNE_CLASSES, PRETRAIN_CLASSES, last_values, only, trainer

#: The monitored stages, bottom-up.
STAGES = ("layer1", "layer2", "layer3", "layer4")
TABLE_TITLE = "SVCCA similarity of each ResNet stage to the pretrained model while fine-tuning on digits 5-9"
SIZE = 32


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(pl.LightningModule):
    """A stem, four stages of ``blocks`` BasicBlocks (widths ``width * (1, 2, 4, 8)``), pooling and a linear head.

    Args:
        width: channels of the stem and the first stage.
        blocks: BasicBlocks per stage.
        num_classes: size of the output layer.
        lr: learning rate of SGD with momentum 0.9.
    """

    def __init__(self, width: int = 8, blocks: int = 1, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inputs = [], width
        for index, outputs in enumerate(width * factor for factor in (1, 2, 4, 8)):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    *(
                        BasicBlock(inputs if b == 0 else outputs, outputs, stride if b == 0 else 1)
                        for b in range(blocks)
                    )
                )
            )
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inputs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of 8x8 digits ``(N, 1, 8, 8)``, upsampled to 32x32 first."""
        x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a batch."""
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum at a constant learning rate."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


def first_values(history: list[dict[str, Any]], reference: str, layers: list[str], epoch: int) -> dict[str, float]:
    """Layer -> SVCCA to ``reference`` at ``epoch``."""
    return {
        row["layer"]: float(row["value"])
        for row in history
        if row["reference"] == reference
        and row["metric"] == "svcca"
        and row["epoch"] == epoch
        and row["layer"] in layers
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Then: tensorboard --logdir <root>. Per-stage curves: svcca/pretrained/<stage>.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="epochs of pretraining on digits 0-4")
    parser.add_argument("--finetune-epochs", type=int, default=8, help="epochs of fine-tuning on digits 5-9")
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage (doubled per stage)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate of SGD with momentum 0.9, both phases")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--probe-size", type=int, default=250, help="held-out digits 5-9 in the probe")
    add_run_arguments(
        parser,
        __file__,
        root_help="where TensorBoard events and svcca_history.csv go",
        quick_help="a short run for the tests: 5 + 3 epochs (the table is printed all the same)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Pretrain, fine-tune with the callback, print the table, and return the results (for the tests).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``pretrained`` (stage -> SVCCA to the pretrained model at the end), ``first_epoch`` (the same after one
        epoch), ``noise_floor``, ``accuracy`` (held-out digits 5-9 after fine-tuning), ``pretrain_accuracy``
        (held-out digits 0-4 after pretraining), ``layers``, ``history``, ``log_dir`` and ``csv``.
    """
    args = parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.finetune_epochs, args.probe_size = 5, 3, 150
    return run_example(run, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, on parsed arguments."""
    train, test = load_data(test_size=600)
    old_train, old_test = only(train, PRETRAIN_CLASSES), only(test, PRETRAIN_CLASSES)
    new_train, new_test = only(train, FINETUNE_CLASSES), only(test, FINETUNE_CLASSES)

    # 1. Pretrain on digits 0-4; a frozen copy is the reference.
    model = ResNet(width=args.width, lr=args.lr)
    trainer(args, args.pretrain_epochs, logger=False).fit(
        model, DataLoader(old_train, batch_size=args.batch_size, shuffle=True)
    )
    pretrain_accuracy = accuracy(model, old_test)
    pretrained = copy.deepcopy(model)

    # 2. A new head, then fine-tune everything on digits 5-9, comparing each stage with the pretrained model.
    model.fc.reset_parameters()
    callback = SVCCACallback(
        probe=new_test.tensors[0][: args.probe_size],  # held-out digits 5-9
        layers=list(STAGES),
        reference={"pretrained": pretrained},
    )
    fine_tuning = trainer(
        args, args.finetune_epochs, callbacks=[callback], logger=TensorBoardLogger(args.root, name=f"seed{args.seed}")
    )
    fine_tuning.fit(model, DataLoader(new_train, batch_size=args.batch_size, shuffle=True))

    new_accuracy = accuracy(model, new_test)
    layers = callback.layers
    columns = {
        "start (new head)": first_values(callback.history, "pretrained", layers, 0),
        "after epoch 1": first_values(callback.history, "pretrained", layers, 1),
        f"after epoch {args.finetune_epochs}": last_values(callback.history, "pretrained", layers),
        "noise floor": last_values(callback.history, "baseline", layers),
    }
    log_dir = Path(fine_tuning.log_dir)

    print(f"\npretrained on digits 0-4: test accuracy {pretrain_accuracy:.3f} on {len(old_test)} held-out digits")
    print(f"fine-tuned on digits 5-9: test accuracy {new_accuracy:.3f} on {len(new_test)} held-out digits\n")
    print(format_columns(TABLE_TITLE, layers, columns, label="stage"))
    print(
        "(every spatial position of a stage's output is a datapoint; 'noise floor': the same measure with the"
        " probe's\n datapoints shuffled, what unrelated representations would score)\n"
    )
    print(f"TensorBoard: tensorboard --logdir {args.root}")
    print(f"history CSV: {log_dir / HISTORY_FILE}")
    return {
        "pretrained": columns[f"after epoch {args.finetune_epochs}"],
        "first_epoch": columns["after epoch 1"],
        "noise_floor": columns["noise floor"],
        "accuracy": new_accuracy,
        "pretrain_accuracy": pretrain_accuracy,
        "layers": layers,
        "history": callback.history,
        "log_dir": log_dir,
        "csv": log_dir / HISTORY_FILE,
    }


if __name__ == "__main__":
    main()
