"""Watch a small CNN on sklearn digits converge bottom-up, layer by layer, with SVCCA.

A CNN (conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear) is trained from scratch on
the 8x8 sklearn digits. Every epoch, :class:`~lightning_svcca.SVCCACallback` runs a fixed probe of held-out
digits through it, snapshots the output of each block after its ReLU, and compares it with the previous epoch
and, at the end of training, with the final model: the learning-dynamics picture of the SVCCA paper (Raghu et
al. 2017), where lower layers settle first and higher ones keep changing for longer.

The script prints the test accuracy and a table with one row per layer, bottom-up: the SVCCA similarity to the
final model at a few epochs, and the first epoch from which it reaches and stays at >= 0.9 and >= 0.95
(:func:`lightning_svcca.output.reporting.convergence_epochs`).

Run::

    python examples/digits_convergence.py            # 20 epochs, well under a minute on two CPU cores
    python examples/digits_convergence.py --quick    # 5 epochs and a smaller probe (what the tests run)
    tensorboard --logdir runs/digits_convergence     # per-layer curves and the layers x epochs heatmaps

TensorBoard events and ``svcca_history.csv`` (every measured value) go under ``--root``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_svcca import SVCCACallback
from lightning_svcca.output.reporting import HISTORY_FILE, convergence_epochs, evenly_spaced, history_matrix

from common import HelpFormatter, add_run_arguments, run_example
from digits import DigitsCNN, accuracy, load_data

#: Monitored layers, bottom-up: the output of each block after its non-linearity.
LAYERS = ("relu1", "relu2", "relu3")
THRESHOLDS = (0.9, 0.95)
TABLE_TITLE = "SVCCA similarity to the final model, per layer (bottom-up)"


def shown_epochs(epochs: list[int], columns: int = 10) -> list[int]:
    """At most ``columns`` of the measured epochs: every early one (where things change), then evenly spaced."""
    if len(epochs) <= columns:
        return list(epochs)
    return epochs[: columns - 3] + evenly_spaced(epochs[columns - 4 :], 4)[1:]


def format_table(history: list[dict[str, Any]], layers: list[str], convergence: dict[str, dict]) -> str:
    """Plain-text table: per layer, SVCCA to the final model at a few epochs and the convergence epochs."""
    names, epochs, matrix = history_matrix(history, "final", "svcca", layers)
    shown = shown_epochs(epochs)
    columns = [epochs.index(e) for e in shown]
    header = (
        f"{'layer':<8}"
        + "".join(f"{f'ep{e}':>6}" for e in shown)
        + "".join(f"{f'>={t:g} from':>12}" for t in THRESHOLDS)
    )
    note = f"(columns ep<n>: after n epochs, of {epochs[-1]}; '>=t from': first epoch from which it stays >= t)"
    lines = [TABLE_TITLE, note, header, "-" * len(header)]
    for i, layer in enumerate(names):
        values = "".join(f"{matrix[i, j]:>6.2f}" for j in columns)
        reached = [convergence[layer][t] for t in THRESHOLDS]
        lines.append(f"{layer:<8}" + values + "".join(f"{'never' if e is None else e:>12}" for e in reached))
    return "\n".join(lines)


def diagonal_sharpening(maps: list[dict[str, Any]], layers: list[str]) -> dict[int, dict[str, float]]:
    """Per kept epoch: each layer against the same final layer (the map's diagonal) and the mean off it."""
    cells: dict[int, dict[tuple[str, str], float]] = {}
    for row in maps:
        if row["metric"] == "svcca":
            cells.setdefault(row["epoch"], {})[(row["layer"], row["reference_layer"])] = row["value"]
    result = {}
    for epoch, values in sorted(cells.items()):
        off = [value for (a, b), value in values.items() if a != b]
        result[epoch] = {layer: values[(layer, layer)] for layer in layers} | {"off": sum(off) / max(len(off), 1)}
    return result


def format_sharpening(sharpening: dict[int, dict[str, float]], layers: list[str]) -> str:
    """Plain-text view of the cross-layer maps' diagonal over training (the SVCCA paper's Fig. 4)."""
    header = f"{'epoch':<7}" + "".join(f"{layer:>8}" for layer in layers) + f"{'off-diag':>10}"
    lines = ["Cross-layer SVCCA to the final model: the diagonal (each layer vs itself at the end)", header]
    for epoch, values in sharpening.items():
        lines.append(f"{epoch:<7}" + "".join(f"{values[layer]:>8.2f}" for layer in layers) + f"{values['off']:>10.2f}")
    return "\n".join(lines) + "\n"


def is_bottom_up(layers: list[str], convergence: dict[str, dict], threshold: float) -> bool:
    """Whether every layer reaches ``threshold`` for good no later than the layer above it."""
    reached = [convergence[layer][threshold] for layer in layers]
    reached = [float("inf") if e is None else e for e in reached]
    return all(lower <= upper for lower, upper in zip(reached, reached[1:], strict=False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Then: tensorboard --logdir <root>. The history CSV is <root>/seed<seed>/version_<n>/svcca_history.csv.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of SGD with momentum 0.9 (constant)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument(
        "--probe-size",
        type=int,
        default=500,
        help="held-out digits in the probe; each conv position of each probe digit is a datapoint (up to a cap)",
    )
    add_run_arguments(
        parser,
        __file__,
        root_help="where TensorBoard events and svcca_history.csv go",
        quick_help="a short run for the tests: 5 epochs and a 300-digit probe (the table is printed all the same)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with the callback, print the table, and return the results (for the tests).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``accuracy`` (on the held-out digits), ``layers`` (bottom-up), ``convergence`` (layer -> threshold ->
        first epoch or ``None``), ``bottom_up`` (threshold -> whether the layers reach it bottom-up), ``epochs``,
        ``history`` (the callback's rows), ``log_dir`` and ``csv`` (paths).
    """
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.probe_size = 5, 300
    return run_example(run, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, on parsed arguments."""
    train, test = load_data()
    callback = SVCCACallback(
        probe=test.tensors[0][: args.probe_size],  # held-out digits, never trained on
        layers=list(LAYERS),
        reference=("previous", "final"),
        cross_layer=True,  # every layer against every final layer at 0, 25, 50, 75 and 100% of training
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(args.root, name=f"seed{args.seed}"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
    )
    model = DigitsCNN(lr=args.lr)
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True))

    test_accuracy = accuracy(model, test)
    layers = callback.layers
    convergence = convergence_epochs(callback.history, THRESHOLDS, reference="final", layers=layers)
    bottom_up = {t: is_bottom_up(layers, convergence, t) for t in THRESHOLDS}
    log_dir = Path(trainer.log_dir)

    print(f"\ntest accuracy: {test_accuracy:.3f} on {len(test)} held-out digits (seed {args.seed})\n")
    print(format_table(callback.history, layers, convergence))
    verdicts = ", ".join(f">={t:g}: {'yes' if bottom_up[t] else 'no'}" for t in THRESHOLDS)
    print(f"layers settle bottom-up ({' -> '.join(layers)}): {verdicts}\n")
    sharpening = diagonal_sharpening(callback.monitor.cross_layer_maps, layers)
    print(format_sharpening(sharpening, layers))
    print(f"TensorBoard: tensorboard --logdir {args.root}")
    print(f"history CSV: {log_dir / HISTORY_FILE}")
    return {
        "accuracy": test_accuracy,
        "layers": layers,
        "convergence": convergence,
        "bottom_up": bottom_up,
        "epochs": args.epochs,
        "history": callback.history,
        "log_dir": log_dir,
        "csv": log_dir / HISTORY_FILE,
        "sharpening": sharpening,
    }


if __name__ == "__main__":
    main()
