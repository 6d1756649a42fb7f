"""Freeze training over several seeds: test accuracy, training time and gradient work, as ratios to no freezing.

Two setups on sklearn digits, 30 epochs each: the CNN of ``examples/freeze_training.py`` and an MLP (three
hidden layers of 128, SGD with momentum) that is still learning at the end, so freezing too early costs accuracy.
Variants: no freezing, the SVCCA paper's linear schedule, convergence freezing with the package's defaults
(SVCCA to the snapshot 5 epochs earlier >= 0.99), and convergence judged on consecutive epochs (lag 1), the
tempting choice that declares convergence far too early. Every variant runs with the callback monitoring the
same layers, so time ratios show what freezing saves, not what monitoring costs.

Prints, per setup and variant, the mean test accuracy over the seeds and its change against no freezing, the
training time ratio, and the share of backward FLOPs skipped (``FlopCounterMode``, per set of frozen layers).
These digits models are so small that a training step is mostly Python overhead, so skipped FLOPs barely show
in wall time; the script ends with the time of a training step of the larger CNN of ``benchmarks/overhead.py``
(batch 128 of 3x16x16 images) with its lower conv layers frozen the way the callback freezes them
(``requires_grad`` off), as a ratio to the unfrozen step.

Run: ``python benchmarks/freeze_training.py [--seeds 0 1 2] [--quick]`` (``--quick``: one seed, 2 epochs, 2 timed
steps, a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from lightning_svcca import FreezePolicy

from common import cpu_threads
from freeze_training import CNN, Setup, train
from overhead import SyntheticCNN


class DigitsMLP(pl.LightningModule):
    """64 pixels -> three hidden ReLU layers -> 10 classes."""

    def __init__(self, lr: float = 0.01, width: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1, self.relu1 = nn.Linear(64, width), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(width, width), nn.ReLU()
        self.fc3, self.relu3 = nn.Linear(width, width), nn.ReLU()
        self.out = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(x.flatten(1)))
        return self.out(self.relu3(self.fc3(self.relu2(self.fc2(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


MLP = Setup("digits MLP", DigitsMLP, ("relu1", "relu2", "relu3"))
VARIANTS = {
    "no freezing": None,
    "linear schedule": FreezePolicy(mode="linear"),
    "convergence (defaults)": FreezePolicy(),
    "consecutive epochs": FreezePolicy(mode="convergence", lag=1),
}


def step_seconds(frozen_convs: int, steps: int = 15) -> float:
    """Median wall time of one SGD step of SyntheticCNN with its first ``frozen_convs`` conv layers frozen."""
    torch.manual_seed(0)
    model = SyntheticCNN()
    convs = [module for module in model.features if isinstance(module, nn.Conv2d)]
    for conv in convs[:frozen_convs]:
        conv.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 3, 16, 16), torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, train every setup and variant, print the table and the step times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs, 2 timed steps")
    args = parser.parse_args(argv)
    steps = 15
    if args.quick:
        args.seeds, args.epochs, steps = [0], 2, 2
    warnings.filterwarnings("ignore")
    results: dict[tuple[str, str], list] = {}
    with tempfile.TemporaryDirectory() as root, cpu_threads(1):
        train("warm-up", None, 1, 0, Path(root))
        for setup in (CNN, MLP):
            for seed in args.seeds:
                for variant, policy in VARIANTS.items():
                    result = train(variant, policy, args.epochs, seed, Path(root), setup)
                    results.setdefault((setup.name, variant), []).append(result)
    print(f"torch {torch.__version__}, 1 thread; {args.epochs} epochs; seeds {args.seeds}")
    columns = f"{'setup':<11} {'variant':<23} {'test acc':>8} {'vs none':>8} {'time ratio':>10} {'grad skipped':>12}"
    print(columns)
    for setup in (CNN, MLP):
        baseline = results[(setup.name, "no freezing")]
        base_accuracy = statistics.mean(r.accuracy for r in baseline)
        base_seconds = statistics.mean(r.seconds for r in baseline)
        for variant in VARIANTS:
            runs = results[(setup.name, variant)]
            accuracy = statistics.mean(r.accuracy for r in runs)
            seconds = statistics.mean(r.seconds for r in runs)
            skipped = statistics.mean(r.gradient_work_skipped for r in runs)
            print(
                f"{setup.name:<11} {variant:<23} {accuracy:>8.3f} {accuracy - base_accuracy:>+8.3f}"
                f" {seconds / base_seconds:>10.2f} {skipped:>12.0%}"
            )
    with cpu_threads(2):
        step_table(steps)


def step_table(steps: int) -> None:
    """The time of a SyntheticCNN training step with 0 to 4 of its conv layers frozen."""
    base = step_seconds(0, steps)
    print(f"\ntraining step of SyntheticCNN (batch 128, 2 threads): {base * 1e3:.1f} ms with nothing frozen")
    for frozen in (1, 2, 3, 4):
        seconds = step_seconds(frozen, steps)
        print(f"  first {frozen} of 4 conv layers frozen: {seconds * 1e3:6.1f} ms  ({seconds / base:.2f} of the step)")


if __name__ == "__main__":
    main()
