"""The "final" reference pass (every stored epoch against the last one) against calling svcca pair by pair.

At the end of fit the callback compares every measured epoch of every layer with the final snapshot. It does so
from the stored snapshots: each layer was decomposed once, when it was measured, so the pass is one product of
two stored bases per pair (``lightning_svcca.pipeline.metrics.evaluate``). The baseline a user would write by hand
keeps the raw activations and calls ``lightning_svcca.svcca(x_epoch, x_final)`` for each pair, decomposing both
sides every time.

Prints both times for 50 epochs x 8 layers and their ratio (target: the stored pass at least 10x faster), and
checks the two agree. A stored pair costs one float32 product of the two kept bases, ``n * k^2``, and a ``k x k``
eigenproblem; the pairwise call costs three float64 Gram products ``n * d^2`` and two eigendecompositions, so
the speed-up falls as the kept share ``k / d`` rises (``--decay`` sets how fast the layer's spectrum falls off).

Run: ``python benchmarks/final_pass.py [--quick]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_svcca import svcca
from lightning_svcca.pipeline.metrics import evaluate, pair_for
from lightning_svcca.pipeline.snapshot import LocalCollective, build_snapshot


def synthetic_activations(
    epochs: int, layers: int, n: int, width: int, decay: float = 1.6, seed: int = 0
) -> list[list[torch.Tensor]]:
    """Float32 activations drifting towards a final representation, like a converging layer.

    Singular values fall off as ``i ** -decay``: with 1.6, SVCCA keeps a bit over half of a 256-wide layer's
    directions, as it does for the trained layers of the digits examples (50-85%).
    """
    generator = torch.Generator().manual_seed(seed)
    scales = torch.arange(1, width + 1, dtype=torch.float32) ** -decay
    runs = []
    for _ in range(layers):
        basis = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
        final = (torch.randn(n, width, generator=generator) * scales) @ basis
        noise = (torch.randn(n, width, generator=generator) * scales) @ basis
        runs.append([final + (1.0 - epoch / (epochs - 1)) * noise for epoch in range(epochs)])
    return runs


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, build the snapshots, time both passes and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--datapoints", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--decay", type=float, default=1.6, help="singular values fall off as i ** -decay")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 4 epochs x 2 layers, n=256, width 64")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.layers, args.datapoints, args.width = 4, 2, 256, 64
    torch.manual_seed(0)
    activations = synthetic_activations(args.epochs, args.layers, args.datapoints, args.width, args.decay)
    collective, device = LocalCollective(), torch.device("cpu")

    # What the callback did during training: one snapshot per layer and epoch (not timed: it is the per-epoch cost).
    snapshots = [
        [
            build_snapshot(
                x,
                collective,
                name="layer",
                keep=0.99,
                keep_by="singular_values",
                full_rank=False,
                with_right=False,
                input_eps=torch.finfo(x.dtype).eps,
            )
            for x in per_epoch
        ]
        for per_epoch in activations
    ]

    start = time.perf_counter()
    jobs = [("svcca", pair_for("svcca", snap, layer[-1])) for layer in snapshots for snap in layer]
    stored = evaluate(jobs, collective, device=device)
    stored_seconds = time.perf_counter() - start

    start = time.perf_counter()
    pairwise = [float(svcca(x, layer[-1])) for layer in activations for x in layer]
    pairwise_seconds = time.perf_counter() - start

    difference = max(abs(a - b) for a, b in zip(stored, pairwise, strict=True))
    pairs = args.epochs * args.layers
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    shape = f"n={args.datapoints}, width={args.width}"
    kept = sum(snapshot.kept for layer in snapshots for snapshot in layer) / pairs
    print(f"final pass over {args.epochs} epochs x {args.layers} layers ({pairs} pairs), {shape}")
    print(f"  SVCCA keeps {kept:.0f} of {args.width} directions on average")
    print(f"  from stored snapshots : {stored_seconds * 1e3:9.1f} ms  ({stored_seconds / pairs * 1e3:.2f} ms/pair)")
    print(f"  svcca pair by pair    : {pairwise_seconds * 1e3:9.1f} ms  ({pairwise_seconds / pairs * 1e3:.2f} ms/pair)")
    print(f"  speed-up              : {pairwise_seconds / stored_seconds:9.1f}x   (target >= 10x)")
    print(f"  largest difference    : {difference:.2e}  (snapshots are float32)")


if __name__ == "__main__":
    main()
