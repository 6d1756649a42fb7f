"""In-sample against held-out values of every measure, on independent data and on a trained digits MLP.

Prints the Markdown table of ``docs/measures.md``: independent Gaussian data at 5 datapoints per direction
(every in-sample CCA value is biased far above 0; held-out values and debiased CKA are not), a digits MLP's two
hidden layers at initialisation against after 30 epochs of SGD, and a trained layer against itself with its
rows shuffled (each measure's noise floor on this probe).

Run: ``python benchmarks/measure_values.py [--quick]`` (``--quick``: narrower Gaussian data and 2 training epochs,
the same rows, a smoke test of a few seconds).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_svcca.measures import cca, linear_cka, procrustes, pwcca, r2cca, rbf_cka, svcca
from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout

MEASURES = {
    "svcca": svcca,
    "cca": lambda x, y: cca(x, y).mean(),
    "pwcca": pwcca,
    "svcca_heldout": svcca_heldout,
    "cca_heldout": lambda x, y: cca_heldout(x, y).mean(),
    "pwcca_heldout": pwcca_heldout,
    "r2cca": r2cca,
    "linear_cka": linear_cka,
    "linear_cka_debiased": lambda x, y: linear_cka(x, y, debiased=True),
    "procrustes": procrustes,
    "rbf_cka": rbf_cka,
}


def row(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    print(f"| {name} | " + " | ".join(f"{float(f(x, y)):.3f}" for f in MEASURES.values()) + " |")


def trained_mlp(epochs: int = 30) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, int]:
    """Hidden activations on 397 held-back digits before and after ``epochs`` of SGD, and the test accuracy."""
    images, labels = load_digits(return_X_y=True)
    x, y = torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    probe = x[1400:]

    def hidden() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            first = mlp[1](mlp[0](probe))
            return {"1 (64 ReLU)": first.double(), "2 (32 ReLU)": mlp[3](mlp[2](first)).double()}

    before = hidden()
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for start in range(0, 1400, 64):
            loss = nn.functional.cross_entropy(mlp(x[start : start + 64]), y[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((mlp(probe).argmax(1) == y[1400:]).float().mean())
    return before, hidden(), accuracy, probe.shape[0]


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the table, one row per data set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Gaussian widths 4 and 8, 2 training epochs")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| data | " + " | ".join(MEASURES) + " |")
    print("| --- " * (len(MEASURES) + 1) + "|")
    generator = torch.Generator().manual_seed(0)
    for d in (4, 8) if args.quick else (20, 64):
        n = 5 * d
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = torch.randn(n, d, generator=generator, dtype=torch.float64)
        row(f"independent Gaussian, n={n}, d={d} (5 per direction)", x, y)
    before, after, accuracy, n = trained_mlp(epochs=2 if args.quick else 30)
    for layer in before:
        row(f"digits MLP layer {layer}, init vs trained ({accuracy:.0%} accuracy), n={n}", before[layer], after[layer])
    first = next(iter(after.values()))
    shuffle = torch.randperm(n, generator=generator)
    row(f"digits MLP layer 1 trained vs itself, rows shuffled, n={n}", first, first[shuffle])


if __name__ == "__main__":
    main()
