"""Does workload (e)'s pretraining transfer? Its fine-tune from the pretrained weights and from a random init.

Both fits use (e)'s recipe, data and seed (``freeze_benchmark.stdlib_workload``: AdamW at 5e-4, warm-up, cosine,
8 epochs, no callback); only the encoder's initial weights differ. Prints each fit's test accuracy after every
epoch and its CPU time.

Run: ``python benchmarks/stdlib_transfer.py [--init pretrained random] [--seed 0] [--windows N] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from freeze_benchmark import fit, run_quietly, stdlib_workload  # noqa: E402
from freeze_workloads import BertClassifier, Sizes  # noqa: E402
from stdlib_corpus import HELD_OUT  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Fit (e) from each chosen initialisation and print its per-epoch test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", nargs="+", choices=["pretrained", "random"], default=["pretrained", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=None, help="training windows (default: the benchmark's 2400)")
    parser.add_argument("--quick", action="store_true", help="the benchmark's --quick sizes")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.windows:
        sizes = dataclasses.replace(sizes, stdlib_windows=args.windows)
    work = stdlib_workload(sizes)

    def body(root: Path) -> None:
        for init in args.init:
            pl.seed_everything(args.seed, verbose=False)
            model = work.make_model()
            if init == "random":
                pl.seed_everything(args.seed, verbose=False)
                model = BertClassifier(len(HELD_OUT), lr=model.lr, config=model.bert.config)
            run = fit(model, work, None, args.seed, root / init)
            curve = ", ".join(f"{100 * accuracy:.1f}" for *_, accuracy in run.points)
            print(
                f"(e) {init} encoder, seed {args.seed}, {len(work.train)} windows: {run.cpu_seconds:.1f} s CPU;"
                f" test accuracy by epoch: {curve}"
            )

    run_quietly(1, None, body)


if __name__ == "__main__":
    main()
