"""Small real models and data for the freezing and DDP tests (importable from worker scripts, unlike conftest)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as ``(1797, 1, 8, 8)`` float32 images in [0, 1] and ``(1797,)`` int64 labels."""
    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(labels)


def digits_tensors(n_train: int = 1200, n_probe: int = 256) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Shuffled (fixed seed) digits as (N, 1, 8, 8) float tensors in [0, 1]: (train, probe, test) splits."""
    images, labels = digit_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    x, y = images[order], labels[order]
    probe_end = n_train + n_probe
    return (x[:n_train], y[:n_train]), (x[n_train:probe_end], y[n_train:probe_end]), (x[probe_end:], y[probe_end:])


class DigitsCNN(pl.LightningModule):
    """conv-BN-ReLU, conv-BN-ReLU, pool, Linear-ReLU, Linear: the blocks that freezing tests reason about."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 1e-3, set_to_none: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)
        self.optimizer_name, self.lr, self.weight_decay, self.set_to_none = optimizer, lr, weight_decay, set_to_none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=self.set_to_none)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr / 10, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


class TinyDigitsCNN(pl.LightningModule):
    """conv -> BatchNorm -> ReLU -> conv -> ReLU -> pool -> Linear -> ReLU -> Dropout -> Linear, tiny widths."""

    def __init__(self, lr: float = 0.1, dropout: float = 0.25) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.relu3 = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc2(self.drop(self.relu3(self.fc1(x.flatten(1)))))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
