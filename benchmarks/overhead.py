"""Callback overhead: epoch wall time with SVCCACallback over epoch time without it, in one process.

The setting of the issue: a synthetic training set of 20,000 samples, a probe of 1024 samples, 6 monitored
layers (4 conv, 2 linear), references previous + final (the "final" heatmap is redrawn live every epoch), the
TensorBoard logger on. Runs without and with the callback alternate (A B A B) so drift of the machine hits
both; the first epoch of each run (warm-up) is left out and the median epoch time is used. Target: ratio <= 1.05.

Also prints the callback's own cost per measurement, the ratio of each monitored epoch to the same epoch without
the callback's own time (immune to run-to-run drift of a shared machine, which here moves whole runs by 10% and
more), and the one-off epoch-0 snapshot at ``on_train_start``.
``--digits`` measures the README demo instead (``examples/digits_convergence.py``: its CNN, 1297 training digits,
a probe of 500, 3 layers, one thread), whose epochs are so short that the measurement is a visible share.
First it prints the time of ``import lightning_svcca`` in a fresh interpreter (best of 5) and which of torch,
Lightning, TensorBoard and matplotlib that import loaded (none: they load when first used).

Run: ``python benchmarks/overhead.py [--quick | --digits]`` (``--quick``: 512 samples, a probe of 128, 3 epochs,
a smoke test of a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback

LAYERS = ["features.1", "features.3", "features.6", "features.9", "head.2", "head.4"]


class SyntheticCNN(pl.LightningModule):
    """Four conv blocks and two linear layers on 3x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (the callback's measurement runs inside it, on the last batch)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


class TimedSVCCACallback(SVCCACallback):
    """Keeps the monitor's per-measurement seconds (by epoch) after the fit."""

    @property
    def measure_seconds(self) -> dict[int, float]:
        return self.monitor.timings


@dataclass
class Workload:
    """A model, its training data and the probe: what is timed."""

    model: Callable[[], pl.LightningModule]
    data: TensorDataset
    probe: torch.Tensor
    layers: list[str]
    batch_size: int


def synthetic_workload(samples: int, probe_size: int) -> Workload:
    """The issue's setting: 20,000 synthetic 3x16x16 images, a probe of 1024, six layers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 16, 16, generator=generator)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    probe = torch.randn(probe_size, 3, 16, 16, generator=generator)
    return Workload(SyntheticCNN, TensorDataset(x, y), probe, LAYERS, 128)


def digits_workload() -> Workload:
    """The README demo's model and data."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits import DigitsCNN, load_data

    train, test = load_data()
    return Workload(DigitsCNN, train, test.tensors[0], ["relu1", "relu2", "relu3"], 64)


def run(workload: Workload, epochs: int, with_callback: bool, root: str):
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [timer]
    svcca = None
    if with_callback:
        svcca = TimedSVCCACallback(probe=workload.probe, layers=workload.layers, reference=("previous", "final"))
        callbacks.insert(0, svcca)
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(workload.model(), DataLoader(workload.data, batch_size=workload.batch_size, shuffle=True))
    return timer.times[1:], svcca


#: Run in a fresh interpreter: the seconds ``import lightning_svcca`` takes and the heavy packages it loaded.
IMPORT_PROBE = """
import sys, time
start = time.perf_counter()
import lightning_svcca
seconds = time.perf_counter() - start
heavy = ("torch", "lightning", "pytorch_lightning", "tensorboard", "matplotlib")
print(seconds, *[name for name in heavy if name in sys.modules])
"""


def import_time(repeats: int = 5) -> tuple[float, list[str]]:
    """Best seconds of ``import lightning_svcca`` in a fresh interpreter, and the heavy packages it loaded."""
    best, loaded = float("inf"), []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True).stdout
        seconds, *loaded = out.split()
        best = min(best, float(seconds))
    return best, loaded


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, time the import, the runs without and with the callback, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--probe", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="512 samples, a probe of 128, 3 epochs, 1 repeat")
    parser.add_argument("--digits", action="store_true", help="the README demo (digits CNN), 10 epochs, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.probe, args.epochs, args.repeats = 512, 128, 3, 1
    seconds, loaded = import_time()
    heavy = ", ".join(loaded) or "none"
    print(f"  import lightning_svcca : {seconds:7.3f} s   (best of 5, fresh interpreter; heavy ones loaded: {heavy})")
    warnings.filterwarnings("ignore")
    if args.digits:
        torch.set_num_threads(1)  # as the example runs
        args.epochs, args.repeats = 10, 3
        workload = digits_workload()
    else:
        workload = synthetic_workload(args.samples, args.probe)
    without, with_, measures, initial, own_share = [], [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            times, _ = run(workload, args.epochs, False, root)
            without += times
            times, callback = run(workload, args.epochs, True, root)
            with_ += times
            # timer epoch k (after the warm-up epoch 0) holds the measurement labelled k + 2
            for index, seconds in enumerate(times):
                measured = callback.measure_seconds[index + 2]
                measures.append(measured)
                own_share.append(seconds / (seconds - measured))
            initial.append(callback.measure_seconds[0])
    base, monitored = statistics.median(without), statistics.median(with_)
    setting = f"{len(workload.data)} samples, probe {len(workload.probe)}, {len(workload.layers)} layers"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {setting}")
    print(f"  epoch without callback : {base:7.2f} s  (median of {len(without)})")
    print(f"  epoch with callback    : {monitored:7.2f} s  (median of {len(with_)})")
    print(f"  overhead ratio         : {monitored / base:7.3f}   (target <= 1.05; runs A/B, machine noise included)")
    print(
        f"  same-run ratio         : {statistics.median(own_share):7.3f}   (epoch / (epoch - the callback's own time))"
    )
    what = f"probe pass, {len(workload.layers)} snapshots, comparisons, logging"
    print(f"  one measurement        : {statistics.median(measures):7.2f} s  ({what})")
    print(f"  epoch-0 snapshot       : {statistics.median(initial):7.2f} s  (once, at on_train_start)")


if __name__ == "__main__":
    main()
