"""Freeze training on sklearn digits: no freezing, the SVCCA paper's linear schedule, and convergence freezing.

The small CNN of ``digits_convergence.py`` is trained three times from the same seed, each time with the callback
monitoring the same layers (so time differences come from freezing, not from monitoring).
``SVCCACallback(freeze=FreezePolicy(...))`` freezes layers bottom-up, either on the paper's schedule (layer i of
L at i/L of training) or when the callback has measured that a layer stopped changing (its SVCCA to its own
snapshot ``lag`` epochs earlier stays above a threshold). For each variant the script prints test accuracy,
training wall time, and the share of parameter-gradient work skipped: backward FLOPs of every training step
(counted with ``torch.utils.flop_counter.FlopCounterMode`` for each set of frozen layers) against a run that
freezes nothing.

Run: ``python examples/freeze_training.py`` (about half a minute on 2 CPU cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from lightning_svcca import FreezePolicy, LinearSchedule, SVCCACallback

from common import cpu_threads
from digits import DigitsCNN, accuracy, load_data


@dataclass(frozen=True)
class Setup:
    """What is trained: a model factory and the layers monitored (and frozen), bottom-up."""

    name: str
    model: Callable[[], pl.LightningModule]
    layers: tuple[str, ...]


CNN = Setup("digits CNN", DigitsCNN, ("relu1", "relu2", "relu3"))


def backward_flops(model: nn.Module, frozen: set[str], batch: torch.Tensor) -> float:
    """FLOPs of one backward pass with the parameters of ``frozen`` parameter names not requiring gradients."""
    model = _copy(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    with FlopCounterMode(display=False) as forward:
        output = model(batch)
    with FlopCounterMode(display=False) as total:
        output = model(batch)
        output.sum().backward()
    return total.get_total_flops() - forward.get_total_flops()


def _copy(model: nn.Module) -> nn.Module:
    clone = type(model)(**getattr(model, "hparams", {}))
    clone.load_state_dict(model.state_dict())
    return clone


@dataclass
class Result:
    variant: str
    accuracy: float
    seconds: float
    gradient_work_skipped: float
    frozen: dict[str, int]


def train(variant: str, policy: FreezePolicy | None, epochs: int, seed: int, root: Path, setup: Setup = CNN) -> Result:
    """Train one variant; return its test accuracy, wall time and skipped gradient work."""
    train_data, test_data = load_data()
    pl.seed_everything(seed, verbose=False)
    model = setup.model()
    probe = test_data.tensors[0][:300]
    callback = SVCCACallback(probe=probe, layers=list(setup.layers), reference=("previous",), freeze=policy)
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root / variant,
        callbacks=[callback],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    loader = DataLoader(train_data, batch_size=64, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    skipped = skipped_share(model, callback, epochs, train_data.tensors[0][:64])
    return Result(variant, accuracy(model, test_data), seconds, skipped, dict(callback.frozen))


def skipped_share(model: nn.Module, callback: SVCCACallback, epochs: int, batch: torch.Tensor) -> float:
    """1 - (backward FLOPs summed over the run's epochs) / (the same without freezing)."""
    parameters = callback.monitor.freezing.freezer.parameters
    cache: dict[frozenset[str], float] = {}
    total = 0.0
    for epoch in range(epochs):
        frozen = frozenset(name for layer, at in callback.frozen.items() if at <= epoch for name in parameters[layer])
        if frozen not in cache:
            cache[frozen] = backward_flops(model, set(frozen), batch)
        total += cache[frozen]
    full = cache.get(frozenset()) or backward_flops(model, set(), batch)
    return 1.0 - total / (epochs * full)


def variants() -> dict[str, FreezePolicy | None]:
    """The three variants compared (the convergence policy with the package's defaults)."""
    return {"no freezing": None, "linear schedule": FreezePolicy(LinearSchedule()), "convergence": FreezePolicy()}


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/freeze_training"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="8 epochs (a smoke test, not a comparison)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 8
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    with cpu_threads(args.threads):
        train("warm-up", None, 1, args.seed, args.root)  # first-fit costs (imports, allocator) left out of timings
        results = [train(name, policy, args.epochs, args.seed, args.root) for name, policy in variants().items()]
    print(f"\nfreeze training on sklearn digits, {args.epochs} epochs, seed {args.seed}")
    print(f"{'variant':<16} {'test acc':>8} {'train time':>10} {'grad work skipped':>17}  frozen at epoch")
    for r in results:
        frozen = ", ".join(f"{layer}@{epoch}" for layer, epoch in r.frozen.items()) or "-"
        print(f"{r.variant:<16} {r.accuracy:>8.3f} {r.seconds:>9.1f}s {r.gradient_work_skipped:>16.0%}  {frozen}")
    return results


if __name__ == "__main__":
    main()
