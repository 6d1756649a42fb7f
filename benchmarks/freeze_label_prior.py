"""The task gate on an imbalanced task: progress counted from the loss's start, or from the labels' entropy.

A BERT (hidden 64, 3 layers, from its config) under the HuggingFace ``Trainer`` learns whether token 7 occurs more
often than token 9 in 24 random tokens: 83% of the sequences are class 0. Its loss falls from its start (0.68) to the
entropy of the class frequencies (0.46) within a few steps, because predicting the frequencies is easy, and stays
there for about a hundred steps before the model learns to count. 240 steps (10 epochs of 24), learning rate 1e-3
with a cosine schedule, measured every 20 steps and at each epoch end, a labelled probe of 256 held-out sequences,
accuracy on 1024 others.

Per seed, three fits: no callback; ``FreezePolicy(task=TaskGate(label_prior=False))`` (progress read from the
loss's start, as before); ``FreezePolicy()`` (progress read from the labels' entropy when it is lower). Printed:
test accuracy, the change against no callback, and each frozen layer's step; and where the probe's loss first
fell 10% below the labels' entropy in the fit without the callback.

Run: ``python benchmarks/freeze_label_prior.py [--seeds 0 1 2 3]`` (about 25 s a seed on one CPU thread).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from scipy.stats import entropy
from torch.utils.data import Dataset

from lightning_svcca import FreezePolicy, TaskGate
from lightning_svcca.huggingface import SVCCATrainerCallback

#: Training, probe and test sequences: ``[:TRAIN]``, ``[TRAIN:PROBE_END]``, ``[PROBE_END:]``.
TRAIN, PROBE_END = 768, 1024


def count_task() -> tuple[torch.Tensor, torch.Tensor]:
    """2048 sequences of 24 tokens in 1-99, labelled 1 when token 7 occurs more often than token 9 (17% of them)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(1, 100, (2048, 24), generator=generator)
    return x, (((x == 7).sum(1) - (x == 9).sum(1)) > 0).long()


def label_prior() -> float:
    """The entropy of the probe's class frequencies (nats), computed here with scipy."""
    _, y = count_task()
    return float(entropy(torch.bincount(y[TRAIN:PROBE_END]).numpy()))


class LabelledSequences(Dataset):
    """``(x, y)`` as the dicts a HuggingFace sequence classifier takes: ``{"input_ids": x, "labels": y}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[index], "labels": self.y[index]}


@dataclass
class Fit:
    """One fit: test accuracy, each frozen layer's step, and the probe's loss every 12 steps."""

    accuracy: float
    frozen_at: dict[str, int] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)


def fit(root: Path, policy: FreezePolicy | None, seed: int = 0, callback: bool = True) -> Fit:
    """Fit the BERT for 240 steps with the SVCCA callback and ``policy`` (``callback=False``: without it)."""
    x, y = count_task()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    probe = {"input_ids": x[TRAIN:PROBE_END], "labels": y[TRAIN:PROBE_END]}
    result = Fit(accuracy=0.0)

    class ProbeLossCurve(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN202 - Trainer's hook
            if state.global_step % 12 == 0:
                model.eval()
                with torch.no_grad():
                    result.curve.append((state.global_step, float(model(**probe).loss)))
                model.train()

    callbacks: list = [ProbeLossCurve()]
    monitor = None
    if callback:
        monitor = SVCCATrainerCallback(probe=probe, every_n_train_steps=20, freeze=policy, writers=None)
        callbacks.append(monitor)
    args = transformers.TrainingArguments(
        str(root), max_steps=240, per_device_train_batch_size=32, learning_rate=1e-3, lr_scheduler_type="cosine",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
        data_seed=seed,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=LabelledSequences(x[:TRAIN], y[:TRAIN]), callbacks=callbacks
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its end-of-fit metrics dict, between the table's lines
    trainer.train()
    model.eval()
    with torch.no_grad():
        result.accuracy = float((model(input_ids=x[PROBE_END:]).logits.argmax(1) == y[PROBE_END:]).float().mean())
    for row in monitor.history if monitor else []:
        if row["reference"] == "frozen" and row["value"] == 1.0:
            result.frozen_at.setdefault(row["layer"], row["step"])
    return result


def learnt_at(curve: list[tuple[int, float]], prior: float) -> int | None:
    """The first step whose probe loss is 10% below the labels' entropy (``None``: never)."""
    return next((step for step, loss in curve if loss < 0.9 * prior), None)


def main(argv: list[str] | None = None) -> dict[int, dict[str, Fit]]:
    """Fit each seed's three variants and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)  # the package's freeze lines stay off the table
    transformers.logging.set_verbosity_error()
    prior = label_prior()
    variants = {
        "no callback": None,
        "from its start": FreezePolicy(task=TaskGate(label_prior=False)),
        "FreezePolicy()": FreezePolicy(),
    }
    print(f"labels' entropy of the probe: {prior:.4f} nats")
    results: dict[int, dict[str, Fit]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            runs = {
                name: fit(Path(scratch) / f"{seed}-{index}", policy, seed, callback=policy is not None)
                for index, (name, policy) in enumerate(variants.items())
            }
            results[seed] = runs
            base = runs["no callback"]
            print(
                f"seed {seed}: the probe loss is 10% below the labels' entropy from step {learnt_at(base.curve, prior)}"
            )
            for name, run in runs.items():
                frozen = ", ".join(f"{layer}@{step}" for layer, step in run.frozen_at.items()) or "-"
                change = 100 * (run.accuracy - base.accuracy)
                print(
                    f"  {name:16s} accuracy {100 * run.accuracy:6.2f}%  change {change:+6.2f}  frozen at step: {frozen}"
                )
    return results


if __name__ == "__main__":
    main()
