"""Freeze training end to end: fit wall time and test accuracy against the same fit without freezing or callback.

Workloads where compute dominates on a small CPU: sklearn digits upsampled to 32x32, a three-stage conv net
(``stage1``: two 3x3 convs at 32x32, ``stage2``: two at 16x16, ``stage3``: one at 8x8, then a linear ``head``;
about 1.8 MMAC per sample forward, 84% of it in the two lower stages), batches of 64.

* (a) from scratch on all ten digits: no callback (the baseline), the convergence policy with the package's
  defaults, the SVCCA paper's linear schedule, and the linear schedule with the frozen-prefix cache.
* (b) fine-tuning: the net pretrained on digits 0-4 (untimed, once per seed) is fine-tuned on digits 5-9 with
  the usual lower learning rate for the pretrained stages (head 0.03, stages 0.003): no callback, the
  convergence policy (defaults), the same with the frozen-prefix cache, and ``FreezePolicy.for_fine_tuning()``
  (the convergence policy on consecutive epochs, patience 2, the top two layers kept training) without and with
  the cache.

Both workloads train on a fixed set five times the digits (each training image also shifted by 2 pixels in four
directions), so an epoch outweighs the callback's fixed cost per measurement (probe pass, similarities,
TensorBoard heatmaps within their time share: about 0.15 s here, a third of an epoch of the plain 1257 digits).

Training: SGD with momentum 0.9, weight decay 5e-4; from scratch 12 epochs at learning rate 0.1; pretraining
4 epochs at 0.1; fine-tuning 12 epochs.

Every variant of a seed sees the same initial weights and the same data order; variants run interleaved, seed by
seed, so drift on a shared machine hits them alike. Wall time is ``trainer.fit`` (the callback's probe passes,
similarity measures and TensorBoard logging included); accuracy is on held-out digits after the fit.

Prints per workload and variant: fit seconds (mean and standard deviation over seeds), speedup (baseline mean
over variant mean, with the range of per-seed ratios), the same for the process's CPU time (on a machine shared
with other jobs, wall time also counts the time other processes held the cores; CPU time does not), test
accuracy (mean, sd) and its change in points, when layers froze, and the share of training batches whose prefix
the cache served.

Run: ``python benchmarks/freeze_wallclock.py [--seeds 0 1 2] [--threads 1] [--quick] [--accelerator gpu]``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_baselines import CacheSpy  # noqa: E402

from lightning_svcca import FreezePolicy, SVCCACallback  # noqa: E402

LAYERS = ["stage1", "stage2", "stage3", "head"]


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvNet(pl.LightningModule):
    """Three conv stages on 1x32x32 images and a linear head; SGD with momentum.

    ``backbone_scale`` scales the stages' learning rate against the head's (fine-tuning's usual lower rate for
    pretrained layers).
    """

    def __init__(self, lr: float = 0.1, backbone_scale: float = 1.0) -> None:
        super().__init__()
        self.lr, self.backbone_scale = lr, backbone_scale
        self.stage1 = nn.Sequential(*_conv(1, 8), *_conv(8, 8), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*_conv(8, 16), *_conv(16, 16), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_conv(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(x))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = list(self.head.parameters())
        backbone = [parameter for name, parameter in self.named_parameters() if not name.startswith("head.")]
        groups = [{"params": backbone, "lr": self.lr * self.backbone_scale}, {"params": head}]
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, weight_decay=5e-4)


def forward_flop_shares(model: ConvNet) -> dict[str, float]:
    """Each layer's share of the forward FLOPs of one 1x32x32 sample (``FlopCounterMode``: convs and matmuls)."""
    flops, x = {}, torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        for name in LAYERS:
            with FlopCounterMode(display=False) as counter:
                x = getattr(model, name)(x)
            flops[name] = counter.get_total_flops()
    total = sum(flops.values())
    return {name: count / total for name, count in flops.items()}


@dataclass
class Split:
    """Train and test tensors of one workload."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def digits32(classes: range, limit: int | None = None, shifted_copies: bool = False) -> Split:
    """Digits of ``classes`` upsampled (bilinear) to 1x32x32, split 70/30 with a fixed permutation.

    ``shifted_copies``: the training images also shifted by 2 pixels up, down, left and right (a fixed dataset
    five times as large, made once: every epoch sees the same inputs, as the prefix cache needs).
    """
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(labels)
    keep = torch.isin(y, torch.tensor(list(classes)))
    x, y = x[keep], y[keep]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    cut = int(0.7 * len(x))
    train = (x[:cut], y[:cut]) if limit is None else (x[:limit], y[:limit])
    if shifted_copies:
        images, targets = train
        shifts = [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
        train = (torch.cat([images.roll(shift, dims=(2, 3)) for shift in shifts]), targets.repeat(len(shifts)))
    return Split(train, (x[cut:], y[cut:]))


@dataclass
class Run:
    """One fit's measurements."""

    seconds: float
    cpu_seconds: float
    accuracy: float
    frozen: dict[str, int] = field(default_factory=dict)
    cached_share: float | None = None


def fit(  # noqa: PLR0917 - every setting of one timed fit, as run_all's three calls give them
    model: ConvNet,
    split: Split,
    policy: FreezePolicy | None,
    epochs: int,
    seed: int,
    root: Path,
    accelerator: str = "cpu",
) -> Run:
    """Fit ``model`` (in place) and time it; ``policy=None`` fits without the callback."""
    x, y = split.train
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    callbacks: list[pl.Callback] = []
    callback = None
    if policy is not None:
        callback = SVCCACallback(probe=x[:256], layers=LAYERS, freeze=policy)
        callbacks = [callback, CacheSpy(callback)]
    trainer = pl.Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        accelerator=accelerator,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    frozen = dict(callback.frozen) if callback is not None else {}
    share = callbacks[1].share if callback is not None else None
    return Run(seconds, cpu_seconds, accuracy(model, split.test), frozen, share)


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple[Tensor, Tensor]) -> float:
    """Share of ``test`` classified correctly (in eval mode; the model is left in train mode)."""
    model.eval()
    x, y = test
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(256)])
    model.train()
    return float((predictions == y).float().mean())


def scratch_variants() -> dict[str, FreezePolicy | None]:
    """Workload (a)."""
    return {
        "no callback": None,
        "convergence (defaults)": FreezePolicy(),
        "linear schedule": FreezePolicy(mode="linear"),
        "linear schedule + cache": FreezePolicy(mode="linear", cache_outputs=True),
    }


def finetune_variants() -> dict[str, FreezePolicy | None]:
    """Workload (b)."""
    return {
        "no callback": None,
        "convergence (defaults)": FreezePolicy(),
        "convergence + cache": FreezePolicy(cache_outputs=True),
        "fine-tuning preset, no cache": FreezePolicy.for_fine_tuning(cache_outputs=False),
        "fine-tuning preset": FreezePolicy.for_fine_tuning(),
    }


def run_all(seeds: list[int], quick: bool, root: Path, accelerator: str = "cpu") -> dict[str, dict[str, list[Run]]]:
    """Both workloads, seed by seed, variants interleaved."""
    limit = 128 if quick else None
    scratch_epochs, pretrain_epochs, finetune_epochs = (3, 2, 3) if quick else (12, 4, 12)
    everything = digits32(range(10), limit, shifted_copies=not quick)
    lower = digits32(range(5), limit, shifted_copies=not quick)
    upper = digits32(range(5, 10), limit, shifted_copies=not quick)
    results: dict[str, dict[str, list[Run]]] = {"a": {}, "b": {}}
    fit(
        ConvNet(), everything, None, 1, 0, root / "warm-up", accelerator
    )  # first-fit costs (allocator, imports) left out
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        initial = ConvNet()
        for name, policy in scratch_variants().items():
            run = fit(copy.deepcopy(initial), everything, policy, scratch_epochs, seed, root / f"a{seed}", accelerator)
            results["a"].setdefault(name, []).append(run)
            _progress("a", name, seed, run)
        pl.seed_everything(seed, verbose=False)
        pretrained = ConvNet()
        fit(pretrained, lower, None, pretrain_epochs, seed, root / f"pre{seed}", accelerator)
        pretrained.lr, pretrained.backbone_scale = 0.03, 0.1
        for name, policy in finetune_variants().items():
            run = fit(copy.deepcopy(pretrained), upper, policy, finetune_epochs, seed, root / f"b{seed}", accelerator)
            results["b"].setdefault(name, []).append(run)
            _progress("b", name, seed, run)
    return results


def _progress(workload: str, name: str, seed: int, run: Run) -> None:
    frozen = ", ".join(f"{layer}@{epoch}" for layer, epoch in run.frozen.items()) or "-"
    share = "-" if run.cached_share is None else f"{run.cached_share:.0%}"
    print(
        f"# ({workload}) seed {seed} {name}: {run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU),"
        f" accuracy {100 * run.accuracy:.2f}%, cached {share}, frozen {frozen}",
        flush=True,
    )


def report(results: dict[str, dict[str, list[Run]]], threads: int, seeds: list[int]) -> str:
    """The comparison table, one block per workload."""
    titles = {
        "a": "(a) from scratch, digits 0-9 at 32x32",
        "b": "(b) fine-tuning: pretrained on digits 0-4, fine-tuned on 5-9",
    }
    shares = ", ".join(f"{name} {share:.0%}" for name, share in forward_flop_shares(ConvNet()).items())
    lines = [f"freeze training end to end, {threads} CPU thread(s), seeds {seeds}"]
    lines.append(f"forward FLOPs per sample: {shares}")
    for workload, variants in results.items():
        base = variants["no callback"]
        base_seconds = statistics.mean(run.seconds for run in base)
        base_cpu = statistics.mean(run.cpu_seconds for run in base)
        base_accuracy = statistics.mean(run.accuracy for run in base)
        lines += [
            "",
            titles[workload],
            f"{'variant':<30} {'fit time (s)':>14} {'speedup':>17} {'CPU time (s)':>14} {'CPU speedup':>17}"
            f" {'test acc (%)':>14} {'change':>7}  {'cached':>6}  frozen at epoch (first seed)",
        ]
        for name, runs in variants.items():
            seconds = [run.seconds for run in runs]
            ratios = [b.seconds / run.seconds for b, run in zip(base, runs, strict=True)]
            cpu = [run.cpu_seconds for run in runs]
            cpu_ratios = [b.cpu_seconds / run.cpu_seconds for b, run in zip(base, runs, strict=True)]
            accuracies = [100 * run.accuracy for run in runs]
            shares = [run.cached_share for run in runs if run.cached_share is not None]
            frozen = ", ".join(f"{layer}@{epoch}" for layer, epoch in runs[0].frozen.items()) or "-"
            lines.append(
                f"{name:<30} {statistics.mean(seconds):>7.1f} ± {_sd(seconds):<4.1f}"
                f" {base_seconds / statistics.mean(seconds):>6.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                f" {statistics.mean(cpu):>7.1f} ± {_sd(cpu):<4.1f}"
                f" {base_cpu / statistics.mean(cpu):>6.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
                f" {statistics.mean(accuracies):>7.2f} ± {_sd(accuracies):<4.2f}"
                f" {statistics.mean(accuracies) - 100 * base_accuracy:>+7.2f}"
                f"  {(f'{statistics.mean(shares):.0%}' if shares else '-'):>6}  {frozen}"
            )
    return "\n".join(lines)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[Run]]]:
    """Parse the command line, run both workloads, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads: one keeps CPU time free of threads spinning while others run on a shared machine",
    )
    parser.add_argument("--root", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument(
        "--accelerator", default="cpu", help="Lightning accelerator (on a GPU, wall time is the figure to read)"
    )
    parser.add_argument("--quick", action="store_true", help="128 samples, 2-3 epochs, one seed: a smoke test")
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_svcca").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            results = run_all(seeds, args.quick, args.root or Path(scratch), args.accelerator)
    finally:
        torch.set_num_threads(previous)
    print(report(results, args.threads, seeds), flush=True)
    return results


if __name__ == "__main__":
    main()
