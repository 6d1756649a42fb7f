"""``lightning-svcca``: reports from a saved history (``svcca_history.csv``), without a model or TensorBoard.

Examples::

    lightning-svcca summary runs/digits/lightning_logs/version_0
    lightning-svcca table runs/.../svcca_history.csv --reference previous
    lightning-svcca heatmap runs/.../svcca_history.csv --reference final --out final.png
    lightning-svcca compare a.ckpt b.ckpt --model my_pkg.models:Net --probe probe.pt
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_svcca.reporting import (
    HISTORY_FILE,
    convergence_epochs,
    heatmap_image,
    history_matrix,
    read_history_csv,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "standalone", False):  # commands that read no history (compare)
        return _standalone(args)
    try:
        history = read_history_csv(_history_path(args.history))
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"lightning-svcca: {error}", file=sys.stderr)
        return 2
    return args.command(history, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-svcca", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, function, help_text in (
        ("summary", _summary, "per layer: first epoch that stays above each threshold, last value, freeze epoch"),
        ("table", _table, "the layers x epochs values of one reference and metric"),
        ("heatmap", _heatmap, "draw the layers x epochs heatmap to a PNG file"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command=function)
        command.add_argument("history", help=f"{HISTORY_FILE} or the log directory holding it")
        command.add_argument("--reference", default="final", help="reference to report (default: final)")
        command.add_argument("--metric", default="svcca", help="metric to report (default: svcca)")
        if name == "summary":
            command.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95])
        if name == "heatmap":
            command.add_argument("--out", type=Path, required=True, help="PNG file to write")
    from lightning_svcca.compare_cli import add_compare_command

    add_compare_command(commands)
    return parser


def _standalone(args: argparse.Namespace) -> int:
    try:
        return args.command(args)
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"lightning-svcca: {error}", file=sys.stderr)
        return 2


def _history_path(path: str) -> Path:
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / HISTORY_FILE
    if not candidate.is_file():
        raise FileNotFoundError(f"no history at {candidate}")
    return candidate


def _select(history: list[dict], args: argparse.Namespace) -> tuple[list[str], list[int], object] | None:
    layers, epochs, matrix = history_matrix(history, args.reference, args.metric)
    if not layers:
        available = sorted({(row["metric"], row["reference"]) for row in history})
        print(f"no rows for metric {args.metric!r} and reference {args.reference!r}; available: {available}")
        return None
    return layers, epochs, matrix


def _summary(history: list[dict], args: argparse.Namespace) -> int:
    selected = _select(history, args)
    if selected is None:
        return 1
    layers, _, matrix = selected
    converged = convergence_epochs(history, args.thresholds, reference=args.reference, metric=args.metric)
    frozen: dict[str, int] = {}
    for row in history:
        if row["reference"] == "frozen" and row["value"]:
            frozen[row["layer"]] = min(frozen.get(row["layer"], row["epoch"]), row["epoch"])
    header = ["layer", *(f">={t:g} from" for t in args.thresholds), "last", "frozen at"]
    rows = []
    for i, layer in enumerate(layers):
        last = next((v for v in matrix[i][::-1] if not math.isnan(v)), math.nan)
        epochs = [converged[layer][t] for t in args.thresholds]
        rows.append(
            [layer, *("-" if e is None else str(e) for e in epochs), f"{last:.4f}", str(frozen.get(layer, "-"))]
        )
    print(f"{args.metric} to {args.reference} (layers bottom-up)")
    print(_format(header, rows))
    return 0


def _table(history: list[dict], args: argparse.Namespace) -> int:
    selected = _select(history, args)
    if selected is None:
        return 1
    layers, epochs, matrix = selected
    rows = [[layer, *("" if math.isnan(v) else f"{v:.3f}" for v in matrix[i])] for i, layer in enumerate(layers)]
    print(f"{args.metric} to {args.reference}")
    print(_format(["layer \\ epoch", *map(str, epochs)], rows))
    return 0


def _heatmap(history: list[dict], args: argparse.Namespace) -> int:
    selected = _select(history, args)
    if selected is None:
        return 1
    layers, epochs, matrix = selected
    from matplotlib.image import imsave

    image = heatmap_image(layers, epochs, matrix, title=f"{args.metric} to {args.reference}", label=args.metric)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, image)
    print(f"wrote {args.out}")
    return 0


def _format(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())
