"""Freezing end to end on sound baselines: does ``FreezePolicy()`` pay, against the linear schedule and AutoFreeze?

Workloads (``freeze_workloads.py``): (a) from scratch with random shifts, (b) from scratch on fixed inputs, both a
ResNet-style net on digits at 32x32; (c) fine-tuning a small BERT pretrained in the benchmark (untimed);
(d) LoRA fine-tuning of that BERT; (e) fine-tuning a small BERT pretrained by masked-language modelling on the
Python standard library's source (``pretrain_stdlib_bert.py``: cached, trained on first use, untimed) on which of
eight held-out stdlib packages a window of code comes from (``stdlib_corpus.py``). Every baseline trains under a
cosine learning rate to its plateau.

Variants, all run side by side for each seed (same initial weights, same data order, interleaved so that drift on
a shared machine hits them alike):

* ``no callback``: the baseline;
* ``monitor only``: the callback with its defaults and no freeze policy (what measuring costs);
* ``FreezePolicy()`` and ``FreezePolicy(cache_outputs=True)``: the package's defaults, no preset;
* ``linear schedule`` and ``linear + cache``: the SVCCA paper's schedule (``FreezePolicy(mode="linear")``);
* ``AutoFreeze``: Liu et al. 2021's gradient-norm rule (``freeze_baselines.AutoFreeze``), without callback.

The noise-aware variant (``FreezePolicy(noise_aware=True)``) is not run: under the default rule its correction is a
factor on both sides of the movement ratio and cancels, so it decides the same freezes (it did in all 12 fits of
the run at commit be6eae8, ``benchmarks/results/freeze_benchmark.txt`` before this one).

Measured per fit: wall and CPU time of ``trainer.fit`` (the SVCCA callback's work included; the per-epoch test
evaluation taken out), test accuracy after the fit, the time-to-accuracy curve (test accuracy at every epoch
end), when layers froze, the share of batches the prefix cache served.

Printed per workload and variant: fit time and CPU time (mean ± sd over seeds) and speedups against the baseline
(with the range of per-seed ratios), test accuracy (mean ± sd) and its change in points, the time to reach the
baseline's final accuracy minus 0.3 points (mean over seeds; ``never`` when a seed never does) and its speedup,
the cache's served share and the freeze epochs of the first seed. Each fit's line, printed as it ends, also gives
its test accuracy and training time at every epoch end (the per-seed time-to-accuracy curve).

Run: ``python benchmarks/freeze_benchmark.py [--workloads a b c d e] [--seeds 0 1 2] [--threads 1] [--quick]
[--variants NAME ...] [--probe 256]``.
A full run at one thread on an idle 2-core machine takes about 45 minutes for (a)-(d) (the BERT pretraining of (c)
included) and about 20 more for (e) (6 variants x 3 seeds of about 60 s of CPU each), plus about 6 minutes of CPU
the first time (e)'s pretraining runs (cached afterwards).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_baselines import AutoFreeze, CacheSpy, EpochClock, accuracy, spread, time_to_accuracy  # noqa: E402
from freeze_workloads import (  # noqa: E402
    TITLES,
    BertClassifier,
    Classifier,
    RandomShifts,
    ResNetLike,
    Sizes,
    digits32,
    fixed_shifts,
    markov_task,
)
from pretrain_stdlib_bert import Settings as StdlibSettings  # noqa: E402
from pretrain_stdlib_bert import pretrained, stdlib_config  # noqa: E402
from stdlib_corpus import HELD_OUT, package_task  # noqa: E402

from lightning_svcca import FreezePolicy, SVCCACallback  # noqa: E402

#: Accuracy (in points) a variant may be below the baseline's final accuracy and still count as reaching it.
TOLERANCE = 0.3
AUTOFREEZE = "AutoFreeze"
#: The callback with its defaults and no freeze policy: what measuring costs while nothing freezes.
MONITOR_ONLY = "monitor only"
#: (c), (d): the pretraining task's chains, and the perturbation tables (topics) of the language they share with
#: the fine-tuning task (``freeze_workloads.markov_task``).
PRETRAIN_CLASSES, TOPICS = 16, 16
T = TypeVar("T")


def variants() -> dict[str, FreezePolicy | str | None]:
    """Variant name -> a policy for the SVCCA callback, ``AUTOFREEZE``, ``MONITOR_ONLY`` or ``None`` (no callback)."""
    return {
        "no callback": None,
        MONITOR_ONLY: MONITOR_ONLY,
        "FreezePolicy()": FreezePolicy(),
        "FreezePolicy(cache)": FreezePolicy(cache_outputs=True),
        "linear schedule": FreezePolicy(mode="linear"),
        "linear + cache": FreezePolicy(mode="linear", cache_outputs=True),
        AUTOFREEZE: AUTOFREEZE,
    }


@dataclass
class Workload:
    """What a seed of one workload fits: a model factory, its training data, test set, epochs and probe.

    The probe is a held-out validation batch with its labels, ``(inputs, labels)``, disjoint from the training
    and test data: what ``SVCCACallback(probe=None)`` draws from a validation loader, so the freeze rule reads a
    held-out loss (``TaskGate``).
    """

    make_model: Callable[[], Classifier]
    train: Dataset
    test: tuple[Tensor, Tensor]
    epochs: int
    probe: tuple[Tensor, Tensor]
    batch_size: int = 64

    @property
    def probe_inputs(self) -> Tensor:
        """The probe's inputs without their labels."""
        return self.probe[0]


@dataclass
class Run:
    """One fit's measurements."""

    seconds: float
    cpu_seconds: float
    accuracy: float
    points: list[tuple[int, float, float, float]]
    frozen: dict[str, int] = field(default_factory=dict)
    cached_share: float | None = None
    #: The callback's own clock: seconds of its probe passes and of its whole measurements (``None``: no callback).
    probe_seconds: float | None = None
    measuring_seconds: float | None = None


def fit(
    model: Classifier,
    work: Workload,
    variant: FreezePolicy | str | None,
    seed: int,
    root: Path,
    extra_callbacks: list[pl.Callback] | None = None,
) -> Run:
    """Fit ``model`` (in place) under one variant, timing it and evaluating the test set at each epoch end."""
    loader = DataLoader(
        work.train, batch_size=work.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    clock = EpochClock(work.test)
    callbacks: list[pl.Callback] = []
    monitor = spy = autofreeze = None
    if isinstance(variant, FreezePolicy) or variant == MONITOR_ONLY:
        policy = variant if isinstance(variant, FreezePolicy) else None
        monitor = SVCCACallback(probe=work.probe, layers=model.layers, freeze=policy)
        spy = CacheSpy(monitor)
        callbacks = [monitor, spy]
    elif variant == AUTOFREEZE:
        autofreeze = AutoFreeze(model.layers)
        callbacks = [autofreeze]
    trainer = pl.Trainer(
        max_epochs=work.epochs,
        default_root_dir=root,
        accelerator="cpu",
        callbacks=[*callbacks, *(extra_callbacks or []), clock],
        logger=monitor is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    torch.manual_seed(seed)  # the same augmentation draws for every variant
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start - clock.paused
    cpu_seconds = time.process_time() - cpu_start - clock.paused_cpu
    frozen = dict(monitor.frozen) if monitor else dict(autofreeze.frozen) if autofreeze else {}
    run = Run(seconds, cpu_seconds, accuracy(model, work.test), clock.points, frozen, spy.share if spy else None)
    if monitor is not None and monitor.monitor is not None:
        run.probe_seconds = sum(monitor.monitor.probe_timings.values())
        run.measuring_seconds = sum(monitor.monitor.timings.values())
    return run


def conv_workload(key: str, sizes: Sizes) -> Workload:
    """(a) with random shifts or (b) with fixed shifted copies; the last 256 training images are the probe.

    Held out from training (a quarter of them in ``--quick``): a validation probe.
    """
    (x, y), test = digits32(sizes.limit)
    held = min(sizes.probe, len(x) // 4)
    (x, y), probe = (x[:-held], y[:-held]), (x[-held:], y[-held:])
    train = RandomShifts(x, y, sizes.copies) if key == "a" else fixed_shifts(x, y, sizes.copies)
    return Workload(ResNetLike, train, test, sizes.conv_epochs, probe)


def bert_workloads(seed: int, sizes: Sizes, root: Path) -> dict[str, Workload]:
    """(c) and (d) for one seed: pretrain a BERT (untimed) on 16 chains of a language, fine-tune on 4 others."""
    pl.seed_everything(seed, verbose=False)
    pretrained = BertClassifier(classes=PRETRAIN_CLASSES, lr=2e-3)
    source = markov_task(PRETRAIN_CLASSES, 2 * sizes.sequences, seed=100 + seed, language=seed, topics=TOPICS)
    pretrain = Workload(lambda: pretrained, TensorDataset(*source), source, sizes.pretrain_epochs, source)
    fit(pretrained, pretrain, None, seed, root / f"pretrain{seed}")
    held = min(sizes.probe, sizes.sequences // 4)  # the validation probe
    count = sizes.sequences + sizes.test_sequences + held
    x, y = markov_task(4, count, seed=200 + seed, language=seed, topics=TOPICS)
    train, test = (x[: sizes.sequences], y[: sizes.sequences]), (x[sizes.sequences : -held], y[sizes.sequences : -held])
    probe = (x[-held:], y[-held:])
    return {
        "c": Workload(
            lambda: pretrained.fine_tuning(4, 1e-3, lora=False), TensorDataset(*train), test,
            sizes.finetune_epochs, probe,
        ),
        "d": Workload(
            lambda: pretrained.fine_tuning(4, 3e-3, lora=True), TensorDataset(*train), test,
            sizes.lora_epochs, probe,
        ),
    }  # fmt: skip


def stdlib_workload(sizes: Sizes) -> Workload:
    """(e): the stdlib-pretrained BERT fine-tuned on which held-out package a window comes from.

    The weights come from ``pretrain_stdlib_bert.pretrained`` (cached, trained on first use), the task from
    ``stdlib_corpus.package_task``; data and weights are the same for every seed (the head's init is not).
    """
    settings = StdlibSettings.quick() if sizes.stdlib_quick_pretraining else StdlibSettings()
    encoder, vocabulary = pretrained(settings)
    pretrained_model = BertClassifier(len(HELD_OUT), config=stdlib_config(len(vocabulary)))
    pretrained_model.bert.load_state_dict(encoder)
    held = min(sizes.probe, sizes.stdlib_test_windows // 4)  # validation probe: test files windows, untested
    train, (x, y) = package_task(vocabulary, sizes.stdlib_windows, sizes.stdlib_test_windows + held)
    return Workload(
        lambda: pretrained_model.fine_tuning(len(HELD_OUT), 5e-4, lora=False), TensorDataset(*train),
        (x[held:], y[held:]), sizes.stdlib_epochs, (x[:held], y[:held]),
    )  # fmt: skip


def seeded_workloads(
    workloads: list[str], seeds: list[int], sizes: Sizes, root: Path
) -> Iterator[tuple[int, str, Workload, Classifier]]:
    """``(seed, key, workload, initial model)`` for each seed and workload, after an untimed warm-up fit.

    The warm-up pays the imports and first calls that no measured fit should; (c) and (d) pretrain their BERT
    once per seed (untimed). Each initial model is made under the seed, for every variant to start from a copy.
    """
    warm = conv_workload("b", Sizes.quick())
    warm_up = Workload(ResNetLike, warm.train, warm.test, 2, warm.probe)
    for variant in (None, FreezePolicy(cache_outputs=True)):
        fit(ResNetLike(), warm_up, variant, 0, root / "warm-up")
    fixed = {key: conv_workload(key, sizes) for key in workloads if key in "ab"}
    if "e" in workloads:
        fixed["e"] = stdlib_workload(sizes)
    for seed in seeds:
        bert = bert_workloads(seed, sizes, root) if {"c", "d"} & set(workloads) else {}
        for key in workloads:
            work = fixed.get(key) or bert[key]
            pl.seed_everything(seed, verbose=False)
            yield seed, key, work, work.make_model()


def run_all(
    workloads: list[str],
    seeds: list[int],
    sizes: Sizes,
    root: Path,
    variants_for: Callable[[list[str], int], dict[str, FreezePolicy | str | None]],
) -> dict[str, dict[str, list[Run]]]:
    """Every workload and variant, seed by seed, variants interleaved.

    ``variants_for(layers, epochs)``: the variants of a workload (this script: a subset of :func:`variants`, whatever
    the workload; ``freeze_oracle.py``: fixed freezes placed by the workload's layers and epochs).
    """
    results: dict[str, dict[str, list[Run]]] = {key: {} for key in workloads}
    for seed, key, work, initial in seeded_workloads(workloads, seeds, sizes, root):
        for name, variant in variants_for(initial.layers, work.epochs).items():
            run = fit(copy.deepcopy(initial), work, copy.deepcopy(variant), seed, root / f"{key}{seed}")
            results[key].setdefault(name, []).append(run)
            _progress(key, name, seed, run)
    return results


def run_quietly(threads: int, root: Path | None, body: Callable[[Path], T]) -> T:
    """``body(run directory)`` on ``threads`` torch threads, without Lightning's logs and known warnings."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    for name in ("pytorch_lightning", "lightning_svcca", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            return body(root or Path(scratch))
    finally:
        torch.set_num_threads(previous)


def _progress(workload: str, name: str, seed: int, run: Run) -> None:
    frozen = ", ".join(f"{layer}@{epoch}" for layer, epoch in run.frozen.items()) or "-"
    share = "-" if run.cached_share is None else f"{run.cached_share:.0%}"
    curve = " ".join(f"{100 * accuracy:.1f}@{wall:.1f}s" for _, wall, _, accuracy in run.points)
    print(
        f"# ({workload}) seed {seed} {name}: {run.seconds:.1f} s ({run.cpu_seconds:.1f} s CPU),"
        f" accuracy {100 * run.accuracy:.2f}%, cached {share}, frozen {frozen}; by epoch {curve}",
        flush=True,
    )


def report(results: dict[str, dict[str, list[Run]]], threads: int, seeds: list[int]) -> str:
    """One table per workload."""
    lines = [f"freezing end to end, {threads} CPU thread(s), seeds {seeds}"]
    for key, runs_by_variant in results.items():
        base = runs_by_variant["no callback"]
        targets = [run.accuracy - TOLERANCE / 100 for run in base]
        base_tta = statistics.mean(time_to_accuracy(run.points, t) for run, t in zip(base, targets, strict=True))
        lines += [
            "",
            TITLES[key],
            f"{'variant':<20} {'fit time (s)':>13} {'speedup':>17} {'CPU time (s)':>13} {'CPU speedup':>17}"
            f" {'test acc (%)':>14} {'change':>7} {'time to acc (s)':>16} {'speedup':>7} {'cached':>6}"
            "  frozen at epoch (first seed)",
        ]
        for name, runs in runs_by_variant.items():
            lines.append(_row(name, runs, base, targets, base_tta))
    return "\n".join(lines)


def _row(name: str, runs: list[Run], base: list[Run], targets: list[float], base_tta: float) -> str:
    seconds, cpu = [run.seconds for run in runs], [run.cpu_seconds for run in runs]
    ratios = [b.seconds / run.seconds for b, run in zip(base, runs, strict=True)]
    cpu_ratios = [b.cpu_seconds / run.cpu_seconds for b, run in zip(base, runs, strict=True)]
    accuracies = [100 * run.accuracy for run in runs]
    change = statistics.mean(accuracies) - 100 * statistics.mean(run.accuracy for run in base)
    tta = statistics.mean(time_to_accuracy(run.points, t) for run, t in zip(runs, targets, strict=True))
    tta_text = f"{tta:>16.1f} {base_tta / tta:>6.2f}x" if tta < float("inf") else f"{'never':>16} {'-':>7}"
    shares = [run.cached_share for run in runs if run.cached_share is not None]
    frozen = ", ".join(f"{layer.split('.')[-1]}@{epoch}" for layer, epoch in runs[0].frozen.items()) or "-"
    return (
        f"{name:<20} {statistics.mean(seconds):>6.1f} ± {spread(seconds):<4.1f}"
        f" {statistics.mean(base[i].seconds for i in range(len(runs))) / statistics.mean(seconds):>6.2f}x"
        f" ({min(ratios):.2f}-{max(ratios):.2f}) {statistics.mean(cpu):>6.1f} ± {spread(cpu):<4.1f}"
        f" {statistics.mean(b.cpu_seconds for b in base) / statistics.mean(cpu):>6.2f}x"
        f" ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
        f" {statistics.mean(accuracies):>7.2f} ± {spread(accuracies):<4.2f}"
        f" {change:>+7.2f} {tta_text} {(f'{statistics.mean(shares):.0%}' if shares else '-'):>6}  {frozen}"
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[Run]]]:
    """Parse the command line, run the workloads, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(TITLES), default=list(TITLES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: CPU time means something)")
    parser.add_argument("--root", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 epochs, one seed: a smoke test")
    parser.add_argument("--probe", type=int, default=256, help="held-out validation samples in the probe")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(variants()),
        default=list(variants()),
        help="a subset (the baseline always)",
    )
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    sizes = dataclasses.replace(Sizes.quick() if args.quick else Sizes(), probe=args.probe)
    chosen = {name: policy for name, policy in variants().items() if name == "no callback" or name in args.variants}
    results = run_quietly(
        args.threads, args.root, lambda root: run_all(args.workloads, seeds, sizes, root, lambda *_: chosen)
    )
    print(report(results, args.threads, seeds), flush=True)
    return results


if __name__ == "__main__":
    main()
