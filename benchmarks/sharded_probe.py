"""Sharded against unsharded probe under DDP: 2 CPU processes (gloo), one thread each.

With ``shard_probe=True`` (the default) each process runs half of the probe and the Gram statistics are summed
across processes; with ``shard_probe=False`` every process runs the whole probe. The script starts one DDP run of
each kind (Lightning's launcher starts the second process), times the probe pass and the whole measurement on
every rank, and prints the per-rank times and the ratio. Expect the probe pass to take about half as long
sharded.

Run: ``python benchmarks/sharded_probe.py [--quick]`` (``--quick``: a probe of 64 samples, 2 epochs of one batch,
a smoke test; the four processes' start-up is most of its time).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_svcca import SVCCACallback  # noqa: E402

from overhead import LAYERS, SyntheticCNN  # noqa: E402


class TimedCallback(SVCCACallback):
    """Keeps the monitor's probe-pass and whole-measurement seconds after the fit."""

    @property
    def record_seconds(self) -> list[float]:
        return list(self.monitor.probe_timings.values())

    @property
    def measure_seconds(self) -> list[float]:
        return list(self.monitor.timings.values())


def worker(shard: bool, probe_size: int, out: Path, epochs: int = 3) -> None:
    """One rank of a DDP fit: trains, then writes its probe-pass and measurement seconds to ``out``."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 16, 16, generator=generator)
    data = TensorDataset(x, torch.randint(0, 10, (512,), generator=generator))
    probe = torch.randn(probe_size, 3, 16, 16, generator=generator)
    callback = TimedCallback(probe=probe, layers=LAYERS, reference=("previous",), shard_probe=shard, baseline=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[callback],
        logger=False,
        default_root_dir=out,  # the history CSV and snapshot files go to the temporary folder, not the cwd
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
    )
    trainer.fit(SyntheticCNN(), DataLoader(data, batch_size=64))
    result = {"record": callback.record_seconds, "measure": callback.measure_seconds}
    (out / f"shard{int(shard)}-rank{trainer.global_rank}.json").write_text(json.dumps(result))


def launch(shard: bool, probe_size: int, out: Path, epochs: int) -> list[dict]:
    """Start a two-process DDP fit (Lightning's launcher starts rank 1) and read both ranks' timings."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--shard",
        str(int(shard)),
        "--probe",
        str(probe_size),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)
    return [json.loads((out / f"shard{int(shard)}-rank{rank}.json").read_text()) for rank in range(2)]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; run both DDP fits (or, with ``--worker``, be one rank) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a probe of 64 samples, 2 epochs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.probe, args.epochs = 64, 2
    if args.worker:
        worker(bool(args.shard), args.probe, args.out, args.epochs)
        return
    with tempfile.TemporaryDirectory() as root:
        results = {shard: launch(shard, args.probe, Path(root), args.epochs) for shard in (False, True)}
    print(f"torch {torch.__version__}; 2 processes x 1 thread (gloo), probe of {args.probe} samples, 6 layers")
    print(f"{'':>10} {'rank':>4} {'probe pass':>11} {'measurement':>12}")
    medians = {}
    for shard, ranks in results.items():
        for rank, result in enumerate(ranks):
            record, measure = statistics.median(result["record"]), statistics.median(result["measure"])
            medians.setdefault(shard, []).append((record, measure))
            print(f"{'sharded' if shard else 'unsharded':>10} {rank:>4} {record:>10.3f}s {measure:>11.3f}s")
    slowest = {shard: (max(r for r, _ in values), max(m for _, m in values)) for shard, values in medians.items()}
    print(f"  probe pass, sharded / unsharded (slowest rank): {slowest[True][0] / slowest[False][0]:.2f}")
    print(f"  measurement, sharded / unsharded (slowest rank): {slowest[True][1] / slowest[False][1]:.2f}")


if __name__ == "__main__":
    main()
