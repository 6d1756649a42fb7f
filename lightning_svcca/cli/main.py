"""``lightning-svcca``: reports from a saved history (``svcca_history.csv``), without a model or TensorBoard.

Examples::

    lightning-svcca summary runs/digits_convergence        # the folder given to TensorBoard: newest run in it
    lightning-svcca summary runs/digits_convergence --all  # every run in it
    lightning-svcca table runs/.../version_0 --reference previous
    lightning-svcca heatmap runs/.../svcca_history.csv --reference dims --out dims.png
    lightning-svcca compare a.ckpt b.ckpt --model my_pkg.models:Net --probe probe.pt

The metric and the reference default to what the history holds, so runs with other metrics (CKA only, say) or
references work without options. Importing this module imports neither torch nor Lightning, and matplotlib only
when a heatmap is drawn, so the command starts fast.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_svcca import __version__
from lightning_svcca.cli.limits import MAX_CELL_CHARACTERS, check_history_file
from lightning_svcca.core.rows import LAYER_FACTS
from lightning_svcca.core.table import format_table
from lightning_svcca.output.reporting import (
    FREEZE_REFERENCE,
    HISTORY_FILE,
    convergence_epochs,
    frozen_mask,
    heatmap_image,
    heatmap_style,
    history_axis,
    history_matrix,
    read_history_csv,
)

__all__ = ["main"]

#: Preferred default metric when a history holds several (the callback's default first).
METRIC_ORDER = ("svcca", "pwcca", "cca", "linear_cka")
#: Preferred default reference: the SVCCA paper's learning-dynamics view, then convergence between epochs.
REFERENCE_ORDER = ("final", "previous")

_DESCRIPTION = "Reports from a saved lightning-svcca history (svcca_history.csv), without a model or TensorBoard."
_EPILOG = f"""\
HISTORY is a {HISTORY_FILE} file or a folder: the run's log folder (e.g. lightning_logs/version_0) or any
folder above it, such as the one given to tensorboard --logdir; its subfolders are searched and the newest
history is used (--all: each of them). --metric and --reference default to what the history holds: the
metric svcca (else pwcca, cca, linear_cka) and the reference final (else previous). Columns are epochs, or
global steps when measurements share an epoch (a run measured every k steps), so every measurement is shown.

examples:
  lightning-svcca summary runs/digits_convergence
  lightning-svcca table runs/digits_convergence --reference previous
  lightning-svcca heatmap runs/digits_convergence --out final.png
  lightning-svcca heatmap lightning_logs/version_0 --reference dims --out dims.png
"""


class UsageError(Exception):
    """A problem with the command line or the files it names; the message says what and where."""


class NothingToReport(UsageError):
    """The history holds no rows of what was asked for; the message lists what it holds."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0: done, 1: nothing to report, 2: bad input).

    Output piped into a reader that stops early (``| head``) ends the command quietly, with status 0.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture): nothing to flush there
        pass


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "standalone", False):  # commands that read no history (compare)
        return _standalone(args)
    try:
        paths = history_paths(args.history, every=args.all)
    except UsageError as error:
        return _fail(error, 2)
    status = 0
    for index, path in enumerate(paths):
        if len(paths) > 1:
            print(("\n" if index else "") + f"== {path}")
        try:
            history = _read(path)
            status = max(status, args.command(history, args, path, len(paths) > 1))
        except NothingToReport as error:
            status = max(status, _fail(error, 1))
        except BrokenPipeError:
            raise
        except (UsageError, OSError) as error:
            status = max(status, _fail(error, 2))
    return status


def _standalone(args: argparse.Namespace) -> int:
    """Run a command that needs models rather than a history (``compare``).

    Its inputs are files anyone may have crafted: whatever loading or running them raises is one line, status 2.
    """
    try:
        return args.command(args)
    except BrokenPipeError:
        raise
    except (FileNotFoundError, ImportError, ValueError) as error:
        return _fail(error, 2)
    except Exception as error:  # noqa: BLE001 - a crafted file's failure is reported, never a traceback
        return _fail(f"{type(error).__name__}: {error}", 2)


def _fail(error: Exception | str, status: int) -> int:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"lightning-svcca: error: {lines[0][:500]}", file=sys.stderr)
    return status


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        check_history_file(path)
        history = read_history_csv(path)
    except KeyError as error:
        raise UsageError(f"{path} is not a history file: it has no {error} column") from error
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path} is not a history file: {error}") from error
    except csv.Error as error:
        if "field limit" in str(error):
            error = csv.Error(f"a cell is longer than {MAX_CELL_CHARACTERS} characters")
        raise UsageError(f"{path} is not a history file: {error}") from error
    if not history:
        raise NothingToReport(f"{path} holds no rows yet")
    return history


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-svcca",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", title="commands")
    for name, function, help_text in (
        ("summary", _summary, "per layer: first epoch (or step) from which it stays at or above each threshold"),
        ("table", _table, "the layers x epochs (or steps) values of one metric and reference"),
        ("heatmap", _heatmap, "draw the layers x epochs (or steps) heatmap to a PNG file"),
    ):
        command = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.set_defaults(command=function)
        command.add_argument("history", metavar="HISTORY", help=f"a {HISTORY_FILE} file or a folder holding one")
        command.add_argument(
            "--metric",
            help="svcca, pwcca, cca or linear_cka, or freeze with --reference frozen (default: the first of these the"
            " history holds)",
        )
        command.add_argument(
            "--reference",
            help="final, previous, initial, a fixed reference's name, or dims (directions kept), baseline"
            " (noise floor), frozen (default: final, else previous, else the first the history holds)",
        )
        command.add_argument("--all", action="store_true", help="report every history found under HISTORY")
        if name == "summary":
            command.add_argument(
                "--thresholds",
                type=_similarity_level,
                nargs="+",
                default=[0.9, 0.95],
                help="similarity levels in [-1, 1] (default: 0.9 0.95)",
            )
        if name == "heatmap":
            command.add_argument(
                "--out", type=Path, required=True, help="PNG file to write (with --all: one per run, named after it)"
            )
    from lightning_svcca.cli.compare import add_compare_command  # its imports wait until it runs

    add_compare_command(commands)
    return parser


def history_paths(location: str | Path, *, every: bool = False) -> list[Path]:
    """The history files a command line names: the file itself, or those found in a folder and its subfolders.

    Args:
        location: a history CSV file, or a folder searched recursively for :data:`HISTORY_FILE`.
        every: all files found (sorted by path) rather than the newest (by modification time).

    Raises:
        UsageError: nothing there, naming what was searched.
    """
    location = Path(location)
    if location.is_file():
        return [location]
    if not location.exists():
        raise UsageError(f"{location} does not exist; give a {HISTORY_FILE} file or the log folder holding one")
    found = sorted(_find(location, HISTORY_FILE))
    if not found:
        raise UsageError(
            f"no {HISTORY_FILE} in {location} or its subfolders; the callback writes it into the logger's log_dir"
            " (e.g. lightning_logs/version_0) or, without a logger, into the Trainer's default_root_dir"
        )
    if every or len(found) == 1:
        return found
    newest = max(found, key=lambda path: path.stat().st_mtime)
    print(
        f"lightning-svcca: {len(found)} histories under {location}; using the newest, {newest} (--all: each)",
        file=sys.stderr,
    )
    return [newest]


def _find(folder: Path, name: str) -> list[Path]:
    """Every file called ``name`` in ``folder`` and its subfolders (hidden folders skipped, links not followed)."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [sub for sub in folders if not sub.startswith(".")]
        if name in files:
            found.append(Path(root) / name)
    return found


def select(history: list[dict[str, Any]], metric: str | None, reference: str | None) -> tuple[str, str]:
    """The metric and reference to report: the ones asked for, or defaults from what ``history`` holds.

    Raises:
        NothingToReport: no row of the (given or default) pair; the message lists the pairs the history holds.
    """
    pairs = list(dict.fromkeys((row["metric"], row["reference"]) for row in history))
    if reference is None:
        candidates = [r for m, r in pairs if (metric is None or m == metric) and r not in LAYER_FACTS]
        reference = _first(candidates, REFERENCE_ORDER)
    if metric is None:
        candidates = [m for m, r in pairs if reference is None or r == reference]
        metric = _first(candidates, METRIC_ORDER)
    if metric is None or reference is None or (metric, reference) not in pairs:
        asked = " and ".join(
            f"{kind} {name!r}" for kind, name in (("metric", metric), ("reference", reference)) if name
        )
        held = ", ".join(f"--metric {m} --reference {r}" for m, r in sorted(pairs))
        asked = (asked + " as a similarity" if reference is None else asked) or "a similarity"
        raise NothingToReport(f"the history holds no rows for {asked}; it holds: {held}")
    return metric, reference


def _first(candidates: Sequence[str], preferred: Sequence[str]) -> str | None:
    for name in preferred:
        if name in candidates:
            return name
    return candidates[0] if candidates else None


def _matrix(history: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, str, str, list[str], list[int], Any]:
    """The metric, reference and column axis reported, and the layers x columns matrix.

    The columns are epochs, or global steps when two measurements share an epoch: keyed by epoch, one of them
    would hide the other.
    """
    metric, reference = select(history, args.metric, args.reference)
    axis = history_axis(history)
    layers, columns, matrix = history_matrix(history, reference, metric, axis=axis)
    return metric, reference, axis, layers, columns, matrix


def _summary(history: list[dict[str, Any]], args: argparse.Namespace, path: Path, many: bool) -> int:
    metric, reference, axis, layers, columns, matrix = _matrix(history, args)
    frozen: dict[str, int] = {}
    for row in history:
        if row["reference"] == "frozen" and row["value"]:
            frozen[row["layer"]] = min(frozen.get(row["layer"], row[axis]), row[axis])
    lasts = [next((v for v in row[::-1] if not math.isnan(v)), math.nan) for row in matrix]
    frozen_at = "frozen at" if axis == "epoch" else f"frozen at ({axis})"
    if reference in LAYER_FACTS:  # not similarities: thresholds mean nothing, show the range instead
        header = ["layer", f"first ({axis} {columns[0]})", "min", "max", f"last ({axis} {columns[-1]})", frozen_at]
        rows = [
            [layer, *(_number(v) for v in (_first_value(row), _min(row), _max(row), last)), str(frozen.get(layer, "-"))]
            for layer, row, last in zip(layers, matrix, lasts, strict=True)
        ]
        print(f"{heatmap_style(metric, reference)['title']} (layers bottom-up)")
    else:
        converged = convergence_epochs(history, args.thresholds, reference=reference, metric=metric, axis=axis)
        header = ["layer", *(f">={t:g} from" for t in args.thresholds), "last", frozen_at]
        rows = [
            [
                layer,
                *("-" if converged[layer][t] is None else str(converged[layer][t]) for t in args.thresholds),
                f"{last:.4f}",
                str(frozen.get(layer, "-")),
            ]
            for layer, last in zip(layers, lasts, strict=True)
        ]
        print(f"{metric} to {reference} (layers bottom-up; '>=t from': first {axis} from which it stays >= t)")
    print(format_table(header, rows))
    return 0


def _table(history: list[dict[str, Any]], args: argparse.Namespace, path: Path, many: bool) -> int:
    metric, reference, axis, layers, columns, matrix = _matrix(history, args)
    number = _number if reference in LAYER_FACTS else (lambda v: "" if math.isnan(v) else f"{v:.3f}")
    frozen = frozen_mask(history, layers, columns, axis=axis) if reference != FREEZE_REFERENCE else None
    rows = [
        [layer, *(number(v) + ("*" if frozen is not None and frozen[i, j] else "") for j, v in enumerate(row))]
        for i, (layer, row) in enumerate(zip(layers, matrix, strict=True))
    ]
    marked = frozen is not None and bool(frozen.any())
    print(heatmap_style(metric, reference)["title"] + (" (* frozen: 1 to its own past by construction)" * marked))
    print(format_table([f"layer \\ {axis}", *map(str, columns)], rows))
    return 0


def _heatmap(history: list[dict[str, Any]], args: argparse.Namespace, path: Path, many: bool) -> int:
    metric, reference, axis, layers, columns, matrix = _matrix(history, args)
    out = args.out
    if many:  # one file per run: final.png -> final-seed0-version_0.png
        run = path.parent.resolve().relative_to(Path(args.history).resolve())
        out = out.with_name(f"{out.stem}-{'-'.join(run.parts) or 'run'}{out.suffix}")
    from matplotlib.image import imsave

    frozen = frozen_mask(history, layers, columns, axis=axis) if reference != FREEZE_REFERENCE else None
    image = heatmap_image(layers, columns, matrix, **heatmap_style(metric, reference), xlabel=axis, frozen=frozen)
    out.parent.mkdir(parents=True, exist_ok=True)
    imsave(out, image, format="png")
    print(f"wrote {out} ({metric} to {reference}: {len(layers)} layers x {len(columns)} {axis}s)")
    return 0


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def _first_value(row: Any) -> float:
    return next((v for v in row if not math.isnan(v)), math.nan)


def _min(row: Any) -> float:
    finite = [v for v in row if not math.isnan(v)]
    return min(finite) if finite else math.nan


def _max(row: Any) -> float:
    finite = [v for v in row if not math.isnan(v)]
    return max(finite) if finite else math.nan


if __name__ == "__main__":
    sys.exit(main())


def _similarity_level(text: str) -> float:
    """A ``--thresholds`` value: a number in [-1, 1], the range of every similarity (``1.5`` or ``-2`` never is)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is outside [-1, 1], the range of the similarities")
    return value
