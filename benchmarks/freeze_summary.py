"""Summarise the per-run lines of ``benchmarks/freeze_benchmark.py`` when its run stopped before its tables.

The benchmark prints one line per fit as it goes (``# (c) seed 0 FreezePolicy(): 19.1 s (17.2 s CPU), accuracy
69.80%, ...``) and its tables only at the end. This reads those lines (a log of a run, complete or not) and prints,
per workload and variant over the seeds that finished, the mean wall and CPU time, the CPU speedup against "no
callback" of the same seeds, the test accuracy and its change, and the freeze epochs of the first seed.

Run: ``python benchmarks/freeze_summary.py LOG``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(
    r"^# \((?P<workload>\w)\) seed (?P<seed>\d+) (?P<variant>.+?): (?P<wall>[\d.]+) s \((?P<cpu>[\d.]+) s CPU\),"
    r" accuracy (?P<accuracy>[\d.]+)%, cached (?P<cached>\S+), frozen (?P<frozen>.*)$"
)


def summarise(text: str) -> str:
    """One table per workload from the benchmark's per-run lines; only seeds whose baseline finished count."""
    runs: dict[str, dict[str, dict[int, dict[str, str]]]] = defaultdict(lambda: defaultdict(dict))
    for line in text.splitlines():
        match = LINE.match(line.strip())
        if match:
            runs[match["workload"]][match["variant"]][int(match["seed"])] = match.groupdict()
    lines = []
    for workload in sorted(runs):
        variants = runs[workload]
        base = variants.get("no callback", {})
        header = (
            f"{'variant':<22} {'seeds':>5} {'wall s':>7} {'CPU s':>7} {'CPU speedup':>11} {'test acc':>8}"
            f" {'change':>7} {'cached':>6}  frozen at epoch (first seed)"
        )
        lines += ["", f"({workload}) seeds {sorted(base)}", header]
        for variant, by_seed in variants.items():
            seeds = sorted(set(by_seed) & set(base))
            if not seeds:
                continue
            cpu = statistics.mean(float(by_seed[s]["cpu"]) for s in seeds)
            base_cpu = statistics.mean(float(base[s]["cpu"]) for s in seeds)
            accuracy = statistics.mean(float(by_seed[s]["accuracy"]) for s in seeds)
            change = accuracy - statistics.mean(float(base[s]["accuracy"]) for s in seeds)
            first = by_seed[seeds[0]]
            frozen = ", ".join(item.split(".")[-1] for item in first["frozen"].split(", "))
            lines.append(
                f"{variant:<22} {len(seeds):>5} {statistics.mean(float(by_seed[s]['wall']) for s in seeds):>7.1f}"
                f" {cpu:>7.1f} {base_cpu / cpu:>10.2f}x {accuracy:>8.2f} {change:>+7.2f} {first['cached']:>6}  {frozen}"
            )
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> str:
    """Print the summary of the log named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the benchmark's output (stdout)")
    table = summarise(parser.parse_args(argv).log.read_text())
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
