"""Speed of the similarity measures, as ratios to the floor and to a plain numpy implementation.

For each size ``(n, d)`` the script builds float64 tensors ``x`` of shape ``(n, d)`` and ``y = x A + noise`` (a
random linear map of ``x``); ``x`` is full-rank Gaussian, or (sizes marked ``low-rank``) a rank-32 signal plus
1% noise, whose spectrum makes SVCCA keep fewer directions. It times, as the best of ``k`` runs after one
warm-up call:

- the floor: the three Gram products ``X^T X``, ``Y^T Y`` and ``X^T Y`` in float64 torch on the same data. Any
  exact CCA of ``n >= d`` data reads both matrices and forms (at least) these, so nothing can be much faster;
- ``svcca``, ``cca``, ``pwcca`` and ``linear_cka`` from :mod:`lightning_svcca`;
- the same measures written the straightforward way in numpy: centre, ``np.linalg.svd`` of each side, truncation,
  SVD of the cross product ``Ux^T Uy`` (PWCCA: Morcos et al.'s weights; linear CKA: its formula).

It prints each measure's time as a ratio to the floor (``x floor``) and to numpy (``x numpy``, below 1 is
faster than numpy), with the largest difference between the two results as a check that both computed the same.

Target: ``svcca`` within 1.5x of the floor when ``n >> d`` (here ``n >= 8 d``), since on that route a
comparison costs the three Gram products plus ``O(d^3)`` work on ``d x d`` matrices.

The last size, ``(500, 4000)``, has more features than datapoints: there the package works on the ``n x n``
kernel of each side rather than a thin SVD of the data.

Run ``python benchmarks/similarity.py`` (several minutes on two cores) or ``--quick`` (tiny sizes, a smoke test of
a few seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from lightning_svcca import cca, linear_cka, pwcca, svcca

SIZES = [(5000, 512), (5000, 512, "low-rank"), (50000, 64), (20000, 1024), (500, 4000)]
QUICK_SIZES = [(400, 64), (400, 64, "low-rank"), (2000, 16), (100, 200)]
KEEP = 0.99
TARGET = 1.5
EPS = np.finfo(np.float64).eps


def make_data(n: int, d: int, device: str, kind: str = "full", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``x`` (full-rank, or rank 32 plus 1% noise) and ``y = x A + noise`` with a random Gaussian ``A``."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "low-rank":
        signal = torch.randn(n, 32, generator=generator, dtype=torch.float64)
        x = signal @ torch.randn(32, d, generator=generator, dtype=torch.float64)
        x = x + 0.01 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    a = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    y = x @ a + 0.1 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return x.to(device), y.to(device)


def best_of(functions: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Best wall-clock time of each function over ``repeats`` rounds, after one warm-up call each, in seconds.

    The rounds interleave the functions, so that a slow spell of a shared machine hits all of them alike
    rather than one measurement. Interleave only functions of one library: torch's OpenMP workers and numpy's
    BLAS threads busy-wait after a call and slow each other down when alternated on few cores.
    """

    def timed(function: Callable[[], object]) -> float:
        start = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for function in functions.values():  # warm-up: allocator, LAPACK workspaces, thread pools
        timed(function)
    best = dict.fromkeys(functions, math.inf)
    for _ in range(repeats):
        for name, function in functions.items():
            best[name] = min(best[name], timed(function))
    return best


# Plain numpy implementations (the baseline the package should beat).


def _numpy_basis(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred ``a``, its left singular vectors and singular values, cut at numerical rank."""
    centred = a - a.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    rank = int((s > s[0] * max(a.shape) * EPS).sum())
    return centred, u[:, :rank], s[:rank]


def _numpy_kept(s: np.ndarray, keep: float) -> int:
    cumulative = np.cumsum(s)
    return int(np.argmax(cumulative >= keep * cumulative[-1])) + 1


def numpy_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations: singular values of ``Ux^T Uy``."""
    _, ux, _ = _numpy_basis(x)
    _, uy, _ = _numpy_basis(y)
    return np.linalg.svd(ux.T @ uy, compute_uv=False)


def numpy_svcca(x: np.ndarray, y: np.ndarray, keep: float = KEEP) -> float:
    """SVCCA: keep the top singular directions reaching ``keep`` of the sum of singular values, then CCA."""
    _, ux, sx = _numpy_basis(x)
    _, uy, sy = _numpy_basis(y)
    ux, uy = ux[:, : _numpy_kept(sx, keep)], uy[:, : _numpy_kept(sy, keep)]
    return float(np.linalg.svd(ux.T @ uy, compute_uv=False).mean())


def numpy_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """PWCCA (Morcos et al. 2018): correlations weighted by sum_j |<h_i, x_j>| over x's centred neurons."""
    xc, ux, _ = _numpy_basis(x)
    _, uy, _ = _numpy_basis(y)
    a, rho, _ = np.linalg.svd(ux.T @ uy, full_matrices=False)
    alpha = np.abs((ux @ a).T @ xc).sum(axis=1)
    return float((alpha * rho).sum() / alpha.sum())


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


MEASURES: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., object]]] = {
    "svcca": (partial(svcca, keep=KEEP), numpy_svcca),
    "cca": (cca, numpy_cca),
    "pwcca": (pwcca, numpy_pwcca),
    "linear_cka": (linear_cka, numpy_linear_cka),
}


def floor(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three Gram products every exact comparison of ``n >= d`` data needs."""
    return x.T @ x, y.T @ y, x.T @ y


def blas_names() -> tuple[str, str]:
    """The BLAS libraries behind torch and numpy (their speeds differ by CPU vendor), or ``"?"``."""
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    try:
        numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (TypeError, KeyError):
        numpy_blas = "?"
    return (match.group(1) if match else "?"), numpy_blas


def run(sizes: list[tuple], repeats: int, device: str) -> None:
    """Time every measure for every size and print the table."""
    torch_blas, numpy_blas = blas_names()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch_blas}), numpy {np.__version__}"
        f" ({numpy_blas}), {os.cpu_count()} CPUs, device {device}, float64, best of {repeats} after a warm-up call"
    )
    header = (
        f"{'n':>7} {'d':>5} {'floor [ms]':>11}  {'measure':<10} {'time [ms]':>10} {'x floor':>8}"
        f" {'numpy [ms]':>11} {'x numpy':>8} {'|ours - numpy|':>15}"
    )
    print(header)
    print("-" * len(header))
    svcca_ratios = []
    # Every torch timing first, then every numpy one: their thread pools spin after a call and slow each other.
    data = {size: make_data(size[0], size[1], device, *size[2:]) for size in sizes}
    times: dict[tuple, dict[str, float]] = {}
    for size, (x, y) in data.items():
        torch_functions = {"floor": partial(floor, x, y)}
        torch_functions.update({name: partial(ours, x, y) for name, (ours, _) in MEASURES.items()})
        times[size] = best_of(torch_functions, repeats, device)
    time.sleep(1.0)
    for size, (x, y) in data.items():
        x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
        numpy_functions = {f"numpy {name}": partial(reference, x_np, y_np) for name, (_, reference) in MEASURES.items()}
        times[size].update(best_of(numpy_functions, repeats, "cpu"))
    for size, (x, y) in data.items():
        n, d, kind = size[0], size[1], (size[2] if len(size) > 2 else "full")
        x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
        floor_time = times[size]["floor"]
        for index, (name, (ours, reference)) in enumerate(MEASURES.items()):
            ours_time, numpy_time = times[size][name], times[size][f"numpy {name}"]
            difference = np.abs(ours(x, y).cpu().numpy() - np.asarray(reference(x_np, y_np))).max()
            label = f"{n:>7} {d:>5} {1e3 * floor_time:>11.1f}" if index == 0 else " " * 25
            print(
                f"{label}  {name:<10} {1e3 * ours_time:>10.1f} {ours_time / floor_time:>8.2f}"
                f" {1e3 * numpy_time:>11.1f} {ours_time / numpy_time:>8.3f} {difference:>15.1e}"
                + (f"  ({kind})" if index == 0 and kind != "full" else "")
            )
            if name == "svcca":
                svcca_ratios.append((n, d, kind, ours_time / floor_time))
    print()
    for n, d, kind, ratio in svcca_ratios:
        verdict = ("met" if ratio <= TARGET else "MISSED") if n >= 8 * d else "n/a, n not >> d"
        print(
            f"target svcca <= {TARGET}x floor when n >> d: n={n}, d={d} {kind} (n/d = {n / d:.0f}): {ratio:.2f}x,"
            f" {verdict}"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes, one timed call")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5, quick 1)")
    parser.add_argument("--device", default="cpu", help="torch device for the package and the floor (numpy: CPU)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few datapoints per direction at d > n: a speed test, not a measurement
        run(QUICK_SIZES if args.quick else SIZES, repeats, args.device)


if __name__ == "__main__":
    main()
