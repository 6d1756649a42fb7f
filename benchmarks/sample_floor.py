"""The sample-level measures against their floors: the arithmetic each cannot skip, as isolated torch kernels.

For two ``(n, d)`` representations (float64, one thread):

* ``mutual_knn``: the rows scaled to unit length, the two ``n x n`` Gram matrices ``X X^T`` and ``Y Y^T`` (the
  cosines), and a ``topk(k)`` over each. (An earlier floor took the top-k of the raw inner products, which are not
  the cosine neighbours the measure is defined by: the scaling is arithmetic it cannot skip.)
* ``cknna``: the same (its three HSIC terms only need the ``n k`` neighbour pairs' kernel values).
* ``minibatch_cka``: each chunk's two ``b x b`` kernels (``b = 256``), the three inner products of the kernels and
  each kernel's row sums. (An earlier floor left the row sums out, but the unbiased estimator needs ``K 1``: the
  row sums, or rows centred first, which costs the same for ``d <= b``.)
* ``rsa``: the two Gram matrices and a sort of each upper triangle (Spearman's ranks).

Each library function (``lightning_svcca.mutual_knn`` etc., input checks included) is timed against its floor,
alternating, and the medians' ratio printed, in wall time and in CPU time (``time.process_time``: on a shared
machine wall time moves with the other processes).

Run: ``python benchmarks/sample_floor.py [--quick]`` (``--quick``: n = 256 only); ``benchmarks/measurement_floor.py``
prints this table too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_svcca import cknna, minibatch_cka, mutual_knn, rsa

K = 10
CHUNK = 256


def _grams(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return x @ x.T, y @ y.T


def _topk(gram: Tensor) -> Tensor:
    return gram.topk(K, dim=1).indices


def floor_mutual_knn(x: Tensor, y: Tensor) -> None:
    """Unit rows, two Gram matrices (the cosines) and a top-k over each."""
    for gram in _grams(x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)):
        _topk(gram)


def floor_minibatch_cka(x: Tensor, y: Tensor) -> None:
    """Each chunk's two kernels, three elementwise passes over them and each kernel's row sums."""
    for start in range(0, x.shape[0], CHUNK):
        kx, ky = _grams(x[start : start + CHUNK], y[start : start + CHUNK])
        for a, b in ((kx, ky), (kx, kx), (ky, ky)):
            (a * b).sum()
        kx.sum(dim=1), ky.sum(dim=1)


def floor_rsa(x: Tensor, y: Tensor) -> None:
    """Two Gram matrices and a sort of each upper triangle."""
    n = x.shape[0]
    upper = torch.triu_indices(n, n, offset=1)
    for gram in _grams(x, y):
        gram[upper[0], upper[1]].sort()


MEASURES: dict[str, tuple[Callable[[Tensor, Tensor], object], Callable[[Tensor, Tensor], None]]] = {
    "mutual_knn": (lambda x, y: mutual_knn(x, y, k=K), floor_mutual_knn),
    "cknna": (lambda x, y: cknna(x, y, k=K), floor_mutual_knn),
    "minibatch_cka": (lambda x, y: minibatch_cka(x, y, batch_size=CHUNK), floor_minibatch_cka),
    "rsa": (lambda x, y: rsa(x, y), floor_rsa),
}


def _seconds(function: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``function()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def _repeats(repeats: int, seconds: float) -> int:
    """At least ``repeats``, more for fast cells (up to 25, about 0.3 s of floor): their medians settle."""
    return max(repeats, min(25, int(0.3 / max(seconds, 1e-6))))


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The median wall and the median CPU seconds."""
    return statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs)


def sample_table(sizes: list[tuple[int, int]], repeats: int) -> None:
    """Print each measure's seconds, its floor's, and the ratio (wall, then CPU), for each ``(n, d)``."""
    print(f"sample-level measures vs floor (float64, k={K}, chunks of {CHUNK}; medians of {repeats} to 25 runs)")
    print(f"{'measure':>13} {'n':>6} {'d':>5}  {'measure s':>9} {'floor s':>8} {'ratio':>6}  {'cpu ratio':>9}")
    generator = torch.Generator().manual_seed(0)
    for n, d in sizes:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = torch.relu(x @ torch.randn(d, d, generator=generator, dtype=torch.float64))
        for name, (measure, floor) in MEASURES.items():
            measure(x, y)  # warm-up
            measured, floored = [], []
            for _ in range(_repeats(repeats, _seconds(lambda floor=floor, x=x, y=y: floor(x, y))[1])):
                floored.append(_seconds(lambda floor=floor, x=x, y=y: floor(x, y)))
                measured.append(_seconds(lambda measure=measure, x=x, y=y: measure(x, y)))
            (m, m_cpu), (f, f_cpu) = (_medians(runs) for runs in (measured, floored))
            print(f"{name:>13} {n:>6} {d:>5}  {m:>9.4f} {f:>8.4f} {m / f:>6.2f}  {m_cpu / max(f_cpu, 1e-9):>9.2f}")
    print()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 256 only (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        sample_table([(256, 64)], 2)
    else:
        sample_table([(1024, 256), (4096, 256), (4096, 64)], args.repeats)


if __name__ == "__main__":
    main()
