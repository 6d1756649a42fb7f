"""What every example shares: its command line (seed, threads, output folder, quick mode) and thread handling."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

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
