"""Peak memory of the snapshot store over a long run, against its budget, for layer widths 256 to 4096.

A run of 50 measured epochs x 8 layers is replayed into a :class:`~lightning_svcca.pipeline.store.SnapshotStore`
with a memory budget (the callback's ``max_snapshot_bytes``) that holds only a few epochs. For each width the script
prints the bytes a store without budget would hold, the most the bounded store ever held in memory, what went
to spill files, and the process's peak resident memory growth; then it reads every snapshot back (as the "final"
pass does) and checks they are intact. Snapshots are real ones (``build_snapshot`` on synthetic ReLU
activations of 1024 probe samples), so their size is what the callback stores: ``U`` of the kept directions in
float32, never the layer's full width.

The store has two modes (``--mode``): ``memory`` (no folder: beyond the budget the least recently used snapshots
spill to a temporary folder, deleted by ``close``; what a monitor without a log directory uses) and
``persistent`` (the run's folder: every snapshot is written to a file when stored, memory holds the recent ones
within the budget, the files stay for the run's checkpoints; what the callback uses). "to disk" is what went to
files: the spilled snapshots, or in persistent mode all of them.

Run: ``python benchmarks/snapshot_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch

from lightning_svcca.pipeline.snapshot import LocalCollective, Snapshot, build_snapshot
from lightning_svcca.pipeline.store import SnapshotStore

MIB = 1 << 20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def layer_snapshot(width: int, n: int, seed: int) -> Snapshot:
    """A real snapshot of a ReLU layer whose activations have a decaying spectrum."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, min(width, n) // 2, generator=generator) * torch.logspace(0, -2, min(width, n) // 2)
    activations = torch.relu(latent @ torch.randn(latent.shape[1], width, generator=generator))
    return build_snapshot(
        activations,
        LocalCollective(),
        name=f"w{width}",
        keep=0.99,
        keep_by="singular_values",
        full_rank=False,
        with_right=False,
        input_eps=torch.finfo(torch.float32).eps,
    )


def _basis(template: Snapshot, epoch: int) -> torch.Tensor:
    """Epoch ``epoch``'s stand-in basis: the template's, moved a little, columns of unit length as real ones have."""
    moved = template.left + 1e-3 * epoch
    return moved / moved.norm(dim=0, keepdim=True)


def replay(width: int, epochs: int, layers: int, budget: int, n: int, mode: str) -> dict[str, float]:
    """Put epochs x layers snapshots into a bounded store, read them all back, report the memory figures."""
    template = layer_snapshot(width, n, seed=width)
    rss_before = peak_rss_mib()
    peak_in_memory, total = 0, 0
    with tempfile.TemporaryDirectory() as root:
        store = SnapshotStore(budget, Path(root) / "snapshots" if mode == "persistent" else None)
        for epoch in range(epochs):
            for layer in range(layers):
                snapshot = Snapshot(
                    _basis(template, epoch), template.singular_values, None, template.kept, template.rank, width
                )
                store.put((f"layer{layer}", str(epoch)), snapshot)
                total += snapshot.nbytes
                peak_in_memory = max(peak_in_memory, store.memory_bytes)
        folder = store.spill_dir
        on_disk = 0 if folder is None else sum(path.stat().st_size for path in folder.glob("*.pt"))
        intact = all(
            torch.equal(store.get((f"layer{layer}", str(epoch))).left, _basis(template, epoch))
            for epoch in range(epochs)
            for layer in range(layers)
        )
        store.close()
        # a temporary spill folder is deleted by close; a persistent folder stays with the run
        cleaned = folder is None or folder.exists() == (mode == "persistent")
    return {
        "kept": template.kept,
        "snapshot_mib": template.nbytes / MIB,
        "unbounded_mib": total / MIB,
        "peak_mib": peak_in_memory / MIB,
        "spilled_mib": on_disk / MIB,
        "rss_growth_mib": peak_rss_mib() - rss_before,
        "intact": intact and cleaned,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, replay the run for every mode and width, print one row each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--datapoints", type=int, default=1024)
    parser.add_argument("--budget-mib", type=float, default=64.0)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--mode", choices=["memory", "persistent", "both"], default="both")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: 4 epochs x 2 layers, 128 datapoints, widths 64 and 128"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.layers, args.datapoints, args.widths, args.budget_mib = 4, 2, 128, [64, 128], 0.1
    budget = int(args.budget_mib * MIB)
    run = f"{args.epochs} epochs x {args.layers} layers, {args.datapoints} datapoints"
    print(f"snapshot store: {run}, budget {args.budget_mib:g} MiB")
    columns = (("mode", 10), ("width", 6), ("kept", 5), ("MiB/snap", 9), ("unbounded", 10), ("peak held", 10))
    columns += (("peak/budget", 11), ("to disk", 9), ("RSS growth", 11), ("ok", 2))
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    modes = ["memory", "persistent"] if args.mode == "both" else [args.mode]
    for mode in modes:
        for width in args.widths:
            r = replay(width, args.epochs, args.layers, budget, args.datapoints, mode)
            print(
                f"{mode:>10} {width:>6} {r['kept']:>5} {r['snapshot_mib']:>9.2f} {r['unbounded_mib']:>9.1f}M"
                f" {r['peak_mib']:>9.1f}M {r['peak_mib'] / args.budget_mib:>11.2f} {r['spilled_mib']:>8.1f}M"
                f" {r['rss_growth_mib']:>10.1f}M {'yes' if r['intact'] else 'NO'}"
            )


if __name__ == "__main__":
    main()
