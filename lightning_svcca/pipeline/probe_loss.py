"""The probe's own loss: what the model's output on the probe says about the task, for the freeze rule.

A probe drawn from validation data (the callback's default) carries its labels; the model's output on it then
gives a held-out loss at every measurement, at no extra forward pass. Taken, in this order, from the model's own
``loss`` (a HuggingFace model given ``labels``), or as cross-entropy between the output's logits (``(N, C)``, or
``(N, T, C)`` with ``-100`` ignored as HuggingFace does) and the probe's integer labels (a dict batch's
``labels``, or the second part of an ``(inputs, targets)`` batch). Anything else gives no loss, and the freeze
rule reads the training loss alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from lightning_svcca.pipeline.probe import Probe

__all__ = ["ProbeLoss", "chunk_loss", "label_entropy", "labels_of"]


def labels_of(chunk: Any, probe: Probe) -> Tensor | None:
    """A probe chunk's integer labels: a dict's ``labels``, or the part after an ``(inputs, targets)`` batch's input."""
    if isinstance(chunk, Mapping):
        labels = chunk.get("labels")
    elif isinstance(chunk, Sequence) and len(chunk) == 2 and probe.input_key == 0:
        labels = chunk[1]
    else:
        return None
    if isinstance(labels, Tensor) and not labels.is_floating_point() and not labels.is_complex():
        return labels
    return None


def label_entropy(probe: Probe) -> float | None:
    """The cross-entropy of predicting the probe's labels from their frequencies alone (nats), or ``None``.

    A classifier that has learnt only how often each class occurs scores this; one that reads its inputs scores
    below it (for token labels, the unigram entropy: a language model that knows only word frequencies). ``-100``
    is ignored, as in the losses; ``None`` without integer labels.
    """
    labels = labels_of(probe.batch, probe)
    if labels is None:
        return None
    labels = labels[labels != -100]
    if labels.numel() == 0 or bool((labels < 0).any()):
        return None
    counts = torch.bincount(labels.reshape(-1).long()).double()
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * shares.log()).sum())


def chunk_loss(output: Any, labels: Tensor | None) -> float | None:
    """The mean loss of one chunk's ``output``: its own ``loss``, or cross-entropy of its logits against ``labels``."""
    own = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(own, Tensor) and own.numel() == 1:
        return float(own)
    if labels is None:
        return None
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.shape[:-1] != labels.shape:
        return None
    labels = labels.to(logits.device)
    if labels.max() >= logits.shape[-1]:
        return None
    valid = labels != -100
    if not bool(valid.any()):
        return None
    return float(functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)))


class ProbeLoss:
    """The probe's loss over one probe pass, chunk by chunk (see the module docstring).

    Args:
        probe: the probe whose chunks are run.
    """

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self._labels: Tensor | None = None
        self._size = 0
        self._total = 0.0
        self._count = 0

    def before_chunk(self, chunk: Any, size: int) -> None:
        """Take a chunk's labels and its ``size`` (samples) before its forward pass."""
        self._labels = labels_of(chunk, self.probe)
        self._size = size

    def add_output(self, output: Any) -> None:
        """Add the chunk's loss, weighted by its samples."""
        with torch.no_grad():
            loss = chunk_loss(output, self._labels)
        if loss is not None and loss == loss:  # NaN: left out
            self._total += loss * self._size
            self._count += self._size

    @property
    def mean(self) -> float | None:
        """The mean loss over the samples that gave one (``None`` when none did)."""
        return self._total / self._count if self._count else None
