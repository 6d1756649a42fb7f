"""Long runs: checkpoint size and per-measurement time at epochs 10, 50 and 200 of one run with the defaults.

One fit of an MLP (64 -> 256 -> 256 -> 256 -> 10, its three ReLU outputs monitored) on synthetic data, with
``SVCCACallback`` at its defaults (references ``("previous", "final")``, the live "final" heatmap, TensorBoard
logger) and a probe of 1024 samples. Each epoch trains on only a few batches, so the run's cost is the callback's.
At each checkpoint epoch the script records:

* the size of ``trainer.save_checkpoint`` (model, optimizer and the callback's state) and of the callback's state
  alone (``torch.save(callback.state_dict())``), each written to a file, measured and deleted;
* the seconds of the callback's ``on_train_batch_end`` on the epoch's last batch (where it measures), at that
  epoch and as the median of the five epochs ending there, in wall time and in this process's CPU time (one
  thread by default: CPU time does not move with other processes' load on a shared machine);
* the run's log folder on disk (event files, history CSV and, where the code keeps them there, snapshot files).

Target: the 200-epoch checkpoint and measurement time within 10% of the 10-epoch values (ratio <= 1.10). The
script uses only the public callback, so it runs against any version of the package on ``PYTHONPATH``.

Run: ``python benchmarks/long_run.py [--quick] [--epochs 10 50 200]`` (``--quick``: epochs 1 and 3 of 2 batches of
16, a probe of 96, a smoke test of a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_svcca import SVCCACallback

MIB = 1 << 20
LAYERS = ["net.1", "net.3", "net.5"]
#: Single measurements are noisy on a shared machine: also report the median of this many epochs ending at each.
WINDOW = 5


class WideMLP(pl.LightningModule):
    """Three hidden layers of width 256 on 64 input features, ten classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class TimedSVCCACallback(SVCCACallback):
    """The default callback, timing its ``on_train_batch_end`` on each epoch's last batch (where it measures)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Wall seconds of the last batch's hook, by completed epoch (1 after the first epoch).
        self.seconds: dict[int, float] = {}
        #: CPU seconds of this process in the same hook: on a shared machine, immune to other processes' load.
        self.cpu_seconds: dict[int, float] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        start, cpu_start = time.perf_counter(), time.process_time()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 == trainer.num_training_batches:
            self.seconds[trainer.current_epoch + 1] = time.perf_counter() - start
            self.cpu_seconds[trainer.current_epoch + 1] = time.process_time() - cpu_start


class CheckpointSizes(pl.Callback):
    """At the chosen completed epochs, the size of a full checkpoint, of the callback's state and of the log folder.

    It must come after the SVCCA callback in the trainer's list, so the epoch's measurement is in the state.
    """

    def __init__(self, svcca: TimedSVCCACallback, epochs: list[int], folder: Path) -> None:
        self.svcca, self.epochs, self.folder = svcca, set(epochs), folder
        self.sizes: dict[int, dict[str, float]] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs:
            return
        start = time.perf_counter()
        path = self.folder / "probe.ckpt"
        trainer.save_checkpoint(path)
        checkpoint = path.stat().st_size
        save_seconds = time.perf_counter() - start
        torch.save(self.svcca.state_dict(), path)
        state = path.stat().st_size
        path.unlink()
        log_folder = sum(f.stat().st_size for f in Path(trainer.log_dir).rglob("*") if f.is_file())
        self.sizes[epoch] = {
            "checkpoint": checkpoint / MIB,
            "state": state / MIB,
            "save_seconds": save_seconds,
            "log_folder": log_folder / MIB,
        }
        recent = range(max(1, epoch - WINDOW + 1), epoch + 1)
        wall = statistics.median(self.svcca.seconds[e] for e in recent)
        cpu = statistics.median(self.svcca.cpu_seconds[e] for e in recent)
        print(
            f"  epoch {epoch}: checkpoint {checkpoint / MIB:.2f} MiB, state {state / MIB:.3f} MiB, log dir"
            f" {log_folder / MIB:.1f} MiB, measured in {self.svcca.seconds[epoch]:.3f} s (median of {len(recent)}:"
            f" {wall:.3f} s wall, {cpu:.3f} s CPU), {sum(self.svcca.seconds.values()):.0f} s measuring so far",
            flush=True,
        )


def synthetic_data(samples: int, probe_size: int) -> tuple[TensorDataset, torch.Tensor]:
    """Gaussian inputs with a decaying spectrum, labels from a fixed random linear map; a probe from the same law."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -1.5, 64)
    x = torch.randn(samples, 64, generator=generator) * scales
    y = (x @ torch.randn(64, 10, generator=generator)).argmax(dim=1)
    probe = torch.randn(probe_size, 64, generator=generator) * scales
    return TensorDataset(x, y), probe


def run(epochs: list[int], batches: int, batch_size: int, probe_size: int, root: Path):
    """One fit of ``max(epochs)`` epochs; returns the callback, the size recorder and the run's seconds."""
    pl.seed_everything(0, verbose=False)
    data, probe = synthetic_data(batches * batch_size, probe_size)
    svcca = TimedSVCCACallback(probe=probe, layers=LAYERS, reference=("previous", "final"))
    sizes = CheckpointSizes(svcca, epochs, root)
    trainer = pl.Trainer(
        max_epochs=max(epochs),
        default_root_dir=str(root),
        callbacks=[svcca, sizes],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(WideMLP(), DataLoader(data, batch_size=batch_size, shuffle=True))
    return svcca, sizes, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the fit and print one row per checkpoint epoch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 50, 200], help="completed epochs to measure")
    parser.add_argument("--batches", type=int, default=4, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--probe", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="epochs 1 and 3, 2 batches of 16, a probe of 96")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batches, args.batch_size, args.probe = [1, 3], 2, 16, 96
    epochs = sorted(set(args.epochs))
    if epochs[0] < 1:
        parser.error(f"--epochs must be completed epochs >= 1, got {args.epochs}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import lightning_svcca

    print(f"lightning_svcca from {Path(lightning_svcca.__file__).parent}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"MLP 64-256-256-256-10, layers {LAYERS}, probe {args.probe}, {args.batches} batches of {args.batch_size}")
    with tempfile.TemporaryDirectory() as root:
        svcca, sizes, seconds = run(epochs, args.batches, args.batch_size, args.probe, Path(root))
    spent = sum(svcca.seconds.values())
    print(f"run: {max(epochs)} epochs in {seconds:.1f} s, of which {spent:.1f} s in the measurements")
    header = ("epoch", "ckpt MiB", "state MiB", "save s", "log dir MiB", "measure s", f"wall med{WINDOW}")
    header += (f"CPU med{WINDOW}", "ckpt x", "state x", "wall x", "CPU x")
    print(" ".join(f"{name:>11}" for name in header))
    first = epochs[0]

    def window(seconds: dict[int, float], epoch: int) -> float:
        return statistics.median(seconds[e] for e in range(max(1, epoch - WINDOW + 1), epoch + 1))

    for epoch in epochs:
        s, base = sizes.sizes[epoch], sizes.sizes[first]
        wall, cpu = window(svcca.seconds, epoch), window(svcca.cpu_seconds, epoch)
        values = (s["checkpoint"], s["state"], s["save_seconds"], s["log_folder"], svcca.seconds[epoch], wall, cpu)
        ratios = (s["checkpoint"] / base["checkpoint"], s["state"] / base["state"])
        ratios += (wall / window(svcca.seconds, first), cpu / window(svcca.cpu_seconds, first))
        print(f"{epoch:>11} " + " ".join(f"{v:>11.3f}" for v in values) + " " + " ".join(f"{r:>11.2f}" for r in ratios))
    print(f"ratios are to epoch {first}; target at epoch {epochs[-1]}: checkpoint and measurement <= 1.10")


if __name__ == "__main__":
    main()
