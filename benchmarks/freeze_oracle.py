"""What any freeze rule could reach on the cached workloads of ``freeze_benchmark.py``: fixed freezes, no rule.

A rule decides *when* layers freeze; this script removes the decision and asks what the timing alone buys.
For each seed it fits the baseline (no callback) and, side by side, fits that freeze a fixed set of layers at a
fixed epoch ``k`` with the prefix cache on (``FreezePolicy(mode="schedule", cache_outputs=True)``):

* ``all@k``: every monitored layer but the head (the most a rule may freeze, ``keep_last=1``): the upper bound
  on the speedup of any rule that freezes nothing before epoch ``k``;
* ``lower@k``: every monitored layer but the last two (the top block keeps training with the head).

``k`` runs over fractions of the fit (``--fractions``, default 1/8, 1/4, 3/8, 1/2 of the epochs). If no ``k`` gives
both a speedup at or above a target and an accuracy within ``TOLERANCE`` points of the baseline, then no rule that
freezes bottom-up and keeps the head training can meet that target on the workload either: it can only freeze
later (slower) or earlier (at more cost in accuracy) than one of these fits, or freeze fewer layers (slower).

Printed like ``freeze_benchmark.py``: fit and CPU time with speedups, test accuracy and its change, time to the
baseline's accuracy, the cache's served share.

Run: ``python benchmarks/freeze_oracle.py [--workloads b c] [--seeds 0 1 2] [--fractions ...] [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import Run, report, run_all, run_quietly  # noqa: E402
from freeze_workloads import TITLES, Sizes  # noqa: E402

from lightning_svcca import FreezePolicy  # noqa: E402

FRACTIONS = (0.125, 0.25, 0.375, 0.5)


def fixed_freezes(layers: list[str], epochs: int, fractions: tuple[float, ...]) -> dict[str, FreezePolicy | None]:
    """Variant name -> policy: the baseline, then ``all@k`` and ``lower@k`` for each ``k``."""
    variants: dict[str, FreezePolicy | None] = {"no callback": None}
    for fraction in fractions:
        epoch = max(1, round(fraction * epochs))
        for name, frozen in (("all", layers[:-1]), ("lower", layers[:-2])):
            schedule = dict.fromkeys(frozen, epoch)
            variants[f"{name}@{epoch} + cache"] = FreezePolicy(mode="schedule", schedule=schedule, cache_outputs=True)
    return variants


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[Run]]]:
    """Parse the command line, run the fixed freezes, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(TITLES), default=["b", "c"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one: CPU time means something)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 3 epochs, one seed: a smoke test")
    args = parser.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    sizes = Sizes.quick() if args.quick else Sizes()
    fractions = tuple(args.fractions)
    results = run_quietly(
        args.threads,
        None,
        lambda root: run_all(
            args.workloads, seeds, sizes, root, lambda layers, epochs: fixed_freezes(layers, epochs, fractions)
        ),
    )
    print(report(results, args.threads, seeds), flush=True)
    return results


if __name__ == "__main__":
    main()
