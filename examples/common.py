"""What every example shares: its command line (seed, threads, output folder, quick mode) and thread handling."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with the module docstring as written and each option's default."""


def add_run_arguments(parser: argparse.ArgumentParser, script: str, *, root_help: str, quick_help: str) -> None:
    """``--seed``, ``--threads``, ``--root`` (default ``runs/<script>``) and ``--quick``."""
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the order of the training data")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; one is fastest for a model this small (more threads mostly wait for each other)",
    )
    parser.add_argument("--root", type=Path, default=Path("runs") / Path(script).stem, help=root_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch CPU threads, then restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def format_columns(
    title: str,
    layers: list[str],
    columns: dict[str, dict[str, float]],
    *,
    label: str = "layer",
    names: dict[str, str] | None = None,
) -> str:
    """Plain-text table: one row per layer (``names`` shortens them), one column per measurement."""
    shown = {layer: (names or {}).get(layer, layer) for layer in layers}
    first = max(len(label), *(len(name) for name in shown.values())) + 2
    width = max(12, *(len(name) + 2 for name in columns))
    header = f"{label:<{first}}" + "".join(f"{name:>{width}}" for name in columns)
    lines = [title, header, "-" * len(header)]
    for layer in layers:
        cells = [values.get(layer, float("nan")) for values in columns.values()]
        lines.append(f"{shown[layer]:<{first}}" + "".join(f"{value:>{width}.3f}" for value in cells))
    return "\n".join(lines)


def run_example(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """``run(args)`` seeded, with ``args.threads`` CPU threads, and without Lightning's advice for large jobs."""
    with cpu_threads(args.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        pl.seed_everything(args.seed, workers=True, verbose=False)
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        return run(args)


def history_value(history: Sequence[Mapping[str, Any]], layer: str, reference: str, epoch: int) -> str:
    """A layer's SVCCA to ``reference`` at ``epoch`` in a monitor's history, to 3 decimals (``-`` when absent)."""
    found = [
        row["value"]
        for row in history
        if (row["layer"], row["reference"], row["epoch"], row["metric"]) == (layer, reference, epoch, "svcca")
    ]
    return f"{found[0]:.3f}" if found else "-"
