"""The four workloads of ``freeze_benchmark.py`` and ``freeze_rule_replay.py``: data, models, training recipes.

* (a) from scratch with augmentation: sklearn digits upsampled to 1x32x32, each epoch ``copies`` passes over the
  training images, each image randomly shifted (zero padding of 2, random 32x32 crop: the inputs never repeat).
* (b) from scratch on fixed inputs: the same images and ``copies`` fixed shifted versions (shifts of 2 pixels),
  made once, so every epoch sees the same inputs (the prefix cache applies).
  Both use :class:`ResNetLike` (a stem and three residual stages, 8-16-32 channels) with SGD, momentum 0.9,
  weight decay 5e-4, a cosine learning rate from 0.1 per step to 0.
* (c) fine-tuning a small BERT (``transformers.BertConfig``, random init, no dropout so its prefix can be cached):
  pretrained (untimed, 24 epochs, to about 93% training accuracy) on telling 16 Markov chains apart from 24-token
  sequences, then fine-tuned on telling 4 other chains of the same language apart (a fresh head), AdamW with a
  warm-up then a cosine learning rate.
* (d) the same fine-tune with PEFT LoRA on ``query`` and ``value`` (rank 8); the head trains in full.
* (e) fine-tuning a small BERT (hidden 128, 4 layers, no dropout) pretrained by masked-language modelling on the
  Python standard library's source (``pretrain_stdlib_bert.py``, cached) on which of eight stdlib packages held
  out of the pretraining a 63-token window of code comes from (``stdlib_corpus.py``; training and test windows
  from different files), AdamW with a warm-up then a cosine learning rate. Its data and model code live in those
  two modules; here only its sizes (``Sizes.stdlib_*``) and the :class:`BertClassifier` it shares with (c).

The chains of a language share a base transition table; each chain adds a perturbation that mixes the language's
16 perturbation tables (its "topics") with its own weights. A class is read from bigram statistics over the whole
sequence (attention has something to learn) and the test accuracy plateaus below 100%. Pretraining and
fine-tuning share the language and its topics and differ in their chains, as a pretrained encoder and its
downstream task share a language: what the encoder learnt transfers. (Until this round the two tasks drew their
chains from different languages; the pretrained layers then had to be relearnt, and no fixed freeze within 0.3
points of the baseline was faster than 1.40x: ``benchmarks/results/freeze_oracle_c_unrelated.txt``.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

#: Workload key -> title.
TITLES = {
    "a": "(a) from scratch, random shifts (augmentation), ResNet-style net, digits at 32x32",
    "b": "(b) from scratch, fixed inputs, ResNet-style net, digits at 32x32",
    "c": "(c) fine-tuning a small BERT (pretrained in the benchmark on other chains of the same language)",
    "d": "(d) LoRA fine-tuning (query, value) of the BERT of (c)",
    "e": "(e) fine-tuning a small BERT pretrained (MLM) on the Python stdlib's source: which package a window is from",
}


@dataclass
class Sizes:
    """How big the runs are (full or ``--quick``)."""

    copies: int = 3  # images per training image and epoch, (a) and (b)
    conv_epochs: int = 12
    sequences: int = 2400  # fine-tuning training sequences; pretraining uses twice as many
    test_sequences: int = 1000
    pretrain_epochs: int = 24
    finetune_epochs: int = 8
    lora_epochs: int = 8
    limit: int | None = None  # training images of (a), (b) (None: all 1257)
    stdlib_windows: int = 2400  # (e): training windows (300 per package); test windows below
    stdlib_test_windows: int = 1200
    stdlib_epochs: int = 8
    stdlib_quick_pretraining: bool = False  # (e): pretrain_stdlib_bert.Settings.quick() instead of the full run
    probe: int = 256  # held-out validation samples in the probe (at most a quarter of the data they come from)

    @classmethod
    def quick(cls) -> Sizes:
        """A smoke test: seconds per fit."""
        return cls(
            copies=1, conv_epochs=3, sequences=128, test_sequences=64, pretrain_epochs=1, finetune_epochs=3,
            lora_epochs=3, limit=128, stdlib_windows=128, stdlib_test_windows=64, stdlib_epochs=3,
            stdlib_quick_pretraining=True,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# (a), (b): digits and a ResNet-style net
# ------------------------------------------------------------------------------------------------------------


def digits32(limit: int | None = None) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(train, test) digits upsampled (bilinear) to 1x32x32, split 70/30 with a fixed permutation."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    cut = int(0.7 * len(x))
    train = (x[:cut], y[:cut]) if limit is None else (x[:limit], y[:limit])
    return train, (x[cut:], y[cut:])


class RandomShifts(Dataset):
    """``copies`` passes over the images per epoch, each image padded by 2 and cropped back at a random offset."""

    def __init__(self, images: Tensor, labels: Tensor, copies: int, pad: int = 2) -> None:
        self.images = nn.functional.pad(images, (pad, pad, pad, pad))
        self.labels, self.copies, self.pad = labels, copies, pad

    def __len__(self) -> int:
        return self.copies * len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index %= len(self.labels)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        size = self.images.shape[-1] - 2 * self.pad
        return self.images[index, :, top : top + size, left : left + size], self.labels[index]


def fixed_shifts(images: Tensor, labels: Tensor, copies: int) -> TensorDataset:
    """The images and ``copies - 1`` fixed shifted versions (2 pixels right, left, down, up, ...), made once."""
    shifts = [(0, 0), (0, 2), (0, -2), (2, 0), (-2, 0), (2, 2), (-2, -2)][:copies]
    x = torch.cat([images.roll(shift, dims=(2, 3)) for shift in shifts])
    return TensorDataset(x, labels.repeat(len(shifts)))


class _Residual(nn.Module):
    """A basic residual block: two 3x3 convs with BatchNorm, a 1x1 projection on the skip when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.relu(self.body(x) + self.skip(x))


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``forward``; SGD or AdamW under a per-step cosine schedule (with warm-up).

    Args:
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum 0.9, weight decay 5e-4) or ``"adamw"`` (weight decay 0.01).
        warmup: share of the steps spent warming up linearly.
    """

    def __init__(self, lr: float, optimizer: str, warmup: float = 0.0) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.warmup = lr, optimizer, warmup

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict:
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(trainable, lr=self.lr, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.01)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(self.warmup * total)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class ResNetLike(Classifier):
    """A 3x3 stem, three residual stages (8, 16, 32 channels at 32x32, 16x16, 8x8), global pooling and a head."""

    layers = ["stem", "stage1", "stage2", "stage3", "head"]

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr, "sgd")
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = _Residual(8, 8, 1)
        self.stage2 = _Residual(8, 16, 2)
        self.stage3 = nn.Sequential(_Residual(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))))


# ------------------------------------------------------------------------------------------------------------
# (c), (d): Markov-chain sequences and a small BERT
# ------------------------------------------------------------------------------------------------------------

VOCAB, LENGTH = 24, 24


def markov_task(
    classes: int, count: int, seed: int, language: int | None = None, topics: int = 0, spread: float = 1.2
) -> tuple[Tensor, Tensor]:
    """``count`` sequences (token 0 = [CLS], then ``LENGTH - 1`` tokens in 1..VOCAB-1) from ``classes`` chains.

    The chains share a base table of transition logits drawn from ``language`` (default: ``seed``). Each adds its
    own perturbation, scaled by ``spread`` (smaller: harder to tell apart): drawn from ``seed``, or, with
    ``topics > 0``, a random unit mixture (drawn from ``seed``) of the language's ``topics`` perturbation tables,
    so that tasks of one language differ in their mixtures, not in what their chains are made of.
    Labels are balanced.
    """
    symbols = VOCAB - 1
    generator = torch.Generator().manual_seed(seed if language is None else language)
    base = 2.0 * torch.randn(symbols, symbols, generator=generator)
    directions = torch.randn(topics, symbols * symbols, generator=generator)
    generator.manual_seed(seed)
    if topics:
        mixing = torch.nn.functional.normalize(torch.randn(classes, topics, generator=generator), dim=1)
        perturbations = (mixing @ directions).view(classes, symbols, symbols)
    else:
        perturbations = torch.randn(classes, symbols, symbols, generator=generator)
    tables = torch.softmax(base + spread * perturbations, dim=-1)
    labels = torch.arange(count) % classes
    tokens = torch.empty(count, LENGTH - 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, symbols, (count,), generator=generator)
    for position in range(1, LENGTH - 1):
        rows = tables[labels, tokens[:, position - 1]]
        tokens[:, position] = torch.multinomial(rows, 1, generator=generator).squeeze(1)
    sequences = torch.cat([torch.zeros(count, 1, dtype=torch.long), tokens + 1], dim=1)
    order = torch.randperm(count, generator=generator)
    return sequences[order], labels[order]


class BertClassifier(Classifier):
    """A BERT and a linear head on the [CLS] position; by default 4 layers, hidden 64, 4 heads, no dropout.

    Args:
        classes: the head's outputs.
        lr: peak learning rate (AdamW, 10% warm-up, cosine).
        config: a ``transformers.BertConfig`` instead of the default ((e) passes its own).
    """

    def __init__(self, classes: int, lr: float = 1e-3, config: object | None = None) -> None:
        import transformers

        super().__init__(lr, "adamw", warmup=0.1)
        config = config or transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=LENGTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.bert: nn.Module = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, classes)

    @property
    def layers(self) -> list[str]:
        """Embeddings, the encoder layers and the head, by their module names (LoRA wrapping renames them)."""
        names = [name for name, _ in self.named_modules()]
        stem = next(name for name in names if name.endswith("embeddings"))
        encoder = [name for name in names if name.rsplit(".", 2)[-2:-1] == ["layer"] and "encoder" in name]
        return [stem, *encoder, "head"]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bert(input_ids=x).last_hidden_state[:, 0])

    def fine_tuning(self, classes: int, lr: float, lora: bool) -> BertClassifier:
        """A copy with a fresh head for ``classes`` and learning rate ``lr``, with LoRA adapters when ``lora``."""
        model = copy.deepcopy(self)
        model.lr, model.head = lr, nn.Linear(self.head.in_features, classes)
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
            model.bert = get_peft_model(model.bert, config)
        return model
