"""What the digits examples share: the sklearn digits (offline), a small CNN, and a few helpers."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import TensorDataset


class DigitsNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear, for 8x8 digits (plain torch).

    Args:
        num_classes: size of the output layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of images ``(N, 1, 8, 8)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class DigitsCNN(DigitsNet, pl.LightningModule):
    """:class:`DigitsNet` as a LightningModule, trained with SGD.

    Args:
        lr: learning rate of SGD with momentum 0.9 (constant, so the layers settle by themselves, not because a
            schedule stops them).
        num_classes: size of the output layer.
    """

    def __init__(self, lr: float = 0.01, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.save_hyperparameters()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on a batch."""
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum at a constant learning rate."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def load_data(test_size: int = 500) -> tuple[TensorDataset, TensorDataset]:
    """Digits scaled to [0, 1] as ``(N, 1, 8, 8)`` images, split into training and held-out test sets.

    The split is fixed (stratified, ``random_state=0``), so every seed is tested and probed on the same digits.
    """
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_size, stratify=labels, random_state=0)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Fraction of correctly classified samples (evaluated in eval mode; the model's mode is restored)."""
    training = model.training
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train(training)
    return correct
