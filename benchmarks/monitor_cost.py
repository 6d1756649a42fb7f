"""What measuring costs a fine-tuning fit, and where it goes: probe passes, the rest of each measurement, the rest.

On the fine-tuning workloads of ``freeze_benchmark.py`` ((c) BERT, (d) LoRA, (e) the stdlib BERT), each seed fits
the baseline (no callback) and, side by side, the callback with its defaults and no freeze policy (what measuring
costs while nothing freezes), with validation probes of several sizes (the first ``k`` of the workload's 256
held-out samples). The callback measures every epoch, and once before training.

Printed per workload and probe size, as a share of the baseline's fit time (means over seeds):

* ``cost``: the fit's extra wall time (and CPU time);
* ``probe passes``: the monitor's forward passes of the probe (its own clock);
* ``rest of measuring``: the rest of its measurements (snapshots, comparisons, TensorBoard scalars and heatmaps);
* ``outside``: the cost left (set-up, the end-of-fit comparisons with the final model, per-batch hooks, the
  logger, the heatmap thread's share of the cores).

The probe's forward pass is a fixed share of an epoch: ``k`` samples forward against the epoch's samples forward
and backward (about three forwards), so ``k / (3 * samples)`` per measurement.

Run: ``python benchmarks/monitor_cost.py [--workloads c d e] [--seeds 0] [--probes 256 128 64] [--threads 1]
[--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import MONITOR_ONLY, Run, Workload, fit, run_quietly, seeded_workloads  # noqa: E402
from freeze_workloads import Sizes  # noqa: E402


def with_probe(work: Workload, samples: int) -> Workload:
    """The workload with the first ``samples`` of its validation probe."""
    inputs, labels = work.probe
    return dataclasses.replace(work, probe=(inputs[:samples], labels[:samples]))


def measure(
    workloads: list[str], seeds: list[int], probes: list[int], root: Path, sizes: Sizes
) -> dict[tuple[str, int], list[tuple[Run, Run]]]:
    """(workload, probe size) -> [(baseline run, monitored run)] over seeds."""
    pairs: dict[tuple[str, int], list[tuple[Run, Run]]] = {}
    for seed, key, work, initial in seeded_workloads(workloads, seeds, sizes, root):
        for samples in probes:
            base = fit(copy.deepcopy(initial), work, None, seed, root / f"{key}{seed}")
            probed = with_probe(work, samples)
            monitored = fit(copy.deepcopy(initial), probed, MONITOR_ONLY, seed, root / f"{key}{seed}")
            pairs.setdefault((key, samples), []).append((base, monitored))
            print(f"# ({key}) seed {seed} probe {samples}: {_shares(base, monitored)}", flush=True)
    return pairs


def _shares(base: Run, monitored: Run) -> str:
    cost = monitored.seconds / base.seconds - 1
    cpu = monitored.cpu_seconds / base.cpu_seconds - 1
    probe = (monitored.probe_seconds or 0.0) / base.seconds
    rest = ((monitored.measuring_seconds or 0.0) - (monitored.probe_seconds or 0.0)) / base.seconds
    return (
        f"baseline {base.seconds:.1f} s, cost {cost:+.1%} wall {cpu:+.1%} CPU; probe passes {probe:.1%},"
        f" rest of measuring {rest:.1%}, outside {cost - probe - rest:+.1%}"
    )


def report(pairs: dict[tuple[str, int], list[tuple[Run, Run]]]) -> str:
    """One line per workload and probe size, means over seeds."""
    lines = [
        f"{'workload':<9} {'probe':>5} {'cost wall':>9} {'cost CPU':>9} {'probe passes':>12} {'rest':>6} {'outside':>8}"
    ]
    for (key, samples), runs in pairs.items():
        cost = _mean(runs, lambda b, m: m.seconds / b.seconds - 1)
        cpu = _mean(runs, lambda b, m: m.cpu_seconds / b.cpu_seconds - 1)
        probe = _mean(runs, lambda b, m: (m.probe_seconds or 0.0) / b.seconds)
        rest = _mean(runs, lambda b, m: ((m.measuring_seconds or 0.0) - (m.probe_seconds or 0.0)) / b.seconds)
        lines.append(
            f"({key}){'':<6} {samples:>5} {cost:>9.1%} {cpu:>9.1%} {probe:>12.1%} {rest:>6.1%}"
            f" {cost - probe - rest:>+8.1%}"
        )
    return "\n".join(lines)


def _mean(runs: list[tuple[Run, Run]], share: Callable[[Run, Run], float]) -> float:
    return statistics.mean(share(base, monitored) for base, monitored in runs)


def main(argv: list[str] | None = None) -> dict[tuple[str, int], list[tuple[Run, Run]]]:
    """Parse the command line, fit, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=["c", "d", "e"], default=["c", "d", "e"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[256, 128, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 epochs: a smoke test")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    pairs = run_quietly(args.threads, None, lambda root: measure(args.workloads, args.seeds, args.probes, root, sizes))
    print(report(pairs), flush=True)
    return pairs


if __name__ == "__main__":
    main()
