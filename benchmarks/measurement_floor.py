"""A measurement against its floor, and the callback's overhead on a fit, in one run.

The floor of a measurement is the arithmetic it cannot skip, as isolated torch kernels: the probe's forward pass,
then for each monitored layer in the monitor's compute dtype (float64 on a CPU) its centred Gram product (over the
smaller side of its ``(datapoints, features)`` rows) and the eigendecomposition of it, the projection of the
centred rows onto the directions SVCCA keeps (``U = Xc V / s``, the basis every later comparison reads; the
eigenvectors themselves when datapoints are fewer than features) and, for each comparison the measurement reports
(``previous`` and the shuffled baseline, the defaults), the cross product ``Ua^T Ub`` of the two float32 bases and
the eigenvalues of its smaller Gram matrix (the canonical correlations: ``eigvalsh`` of ``M M^T``, the fastest of
torch's kernels for singular values, measured against ``svdvals``). An earlier floor stopped at ``eigh``: it left
out the projection and the comparisons, which SVCCA cannot compute without, so it read up to 3x for narrow layers
whose measurement is mostly comparisons. This script times
:meth:`SVCCAMonitor.measure <lightning_svcca.SVCCAMonitor.measure>` (references ``("previous", "final")``, the
defaults) on the same model and probe, on MLPs of widths 64-4096 and 1-32 monitored layers (the ReLU after each
``Linear``), and prints measurement / floor. Each cell alternates floor and measurement a few times after the
weights moved (so ``previous`` and the live ``final`` heatmap have something to compare) and takes the medians.

Then :func:`~lightning_svcca.svcca` against its three-Gram floor at ``n / d = 10`` (``benchmarks/similarity.py``'s
floor and data: ``X^T X``, ``Y^T Y``, ``X^T Y`` of ``(5000, 512)`` float64 matrices). Target: at most 1.2.

Then the first release's overhead setting (``benchmarks/overhead.py``'s workload: 20,000 synthetic samples,
6 layers, a probe of 1024, ``reference=("previous", "final")``, TensorBoard on): the fit time of 3 epochs with
the callback over the time without it, runs alternating (A B A B). Target: at most 1.15 (issue 31).

Everything runs on one thread (``torch.set_num_threads(1)``). The machine may be shared: wall time moves with the
other processes, so CPU time (``time.process_time``) is printed beside it, and ratios are taken within one run.

Cells of more than ``4096**2`` weights per layer times layers (1024 x 32, 4096 x 8, 4096 x 32) run with ``--full``.

Then the sample-level measures (mutual_knn, cknna, minibatch_cka, rsa) against their own floors, as isolated
kernels (``benchmarks/sample_floor.py``: the Gram matrices, top-k, chunk kernels and sorts each needs).

Run: ``python benchmarks/measurement_floor.py [--quick | --full]`` (``--quick``: widths 64 and 256, 1 and 4 layers,
a probe of 256; svcca at (1000, 100); the fit on 512 samples, a probe of 128, 2 epochs; a smoke test of some
seconds).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sample_floor import sample_table  # noqa: E402
from similarity import floor as three_grams  # noqa: E402
from similarity import make_data  # noqa: E402

from lightning_svcca import SVCCAMonitor, svcca  # noqa: E402

from overhead import run as fit_run  # noqa: E402
from overhead import synthetic_workload  # noqa: E402


@dataclass(frozen=True)
class Seconds:
    """Wall and CPU seconds of one timed call."""

    wall: float
    cpu: float


def timed(function: Callable[[], object]) -> Seconds:
    """Wall and CPU seconds of ``function()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return Seconds(time.perf_counter() - wall, time.process_time() - cpu)


def median(samples: list[Seconds]) -> Seconds:
    """The median wall and the median CPU seconds."""
    return Seconds(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples))


def mlp(width: int, depth: int) -> tuple[nn.Sequential, list[str]]:
    """``depth`` blocks ``Linear(width, width) -> ReLU``; the monitored layers are the ReLUs."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*blocks), [str(2 * index + 1) for index in range(depth)]


#: SVCCA's default ``keep``: the fewest leading directions reaching 99% of the singular value sum.
KEEP = 0.99


def floor(
    model: nn.Module, probe: Tensor, layers: list[str], previous: dict[str, Tensor], dtype: torch.dtype = torch.float64
) -> None:
    """The floor: the probe's forward pass, then each layer's basis and its two comparisons.

    ``previous`` holds each layer's basis of the last call (the ``previous`` reference) and is updated.
    """
    outputs: list[Tensor] = []
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(lambda _m, _i, out: outputs.append(out)) for name in layers]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    shuffle = torch.randperm(probe.shape[0], generator=torch.Generator().manual_seed(0))
    for name, rows in zip(layers, outputs, strict=True):
        basis = kept_basis(rows.reshape(rows.shape[0], -1), dtype)
        for other in (previous.get(name, basis), basis.index_select(0, shuffle)):
            cross = (basis.T @ other).to(dtype)
            torch.linalg.eigvalsh(cross @ cross.T if cross.shape[0] <= cross.shape[1] else cross.T @ cross)
        previous[name] = basis


def kept_basis(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """Centre, Gram product, ``eigh``, and the float32 basis of the directions SVCCA keeps."""
    centred = rows.to(dtype)
    centred = centred - centred.mean(0)
    features = centred.shape[0] >= centred.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred if features else centred @ centred.T)
    singular_values = eigenvalues.clamp_min(0.0).sqrt()  # ascending: the kept directions are the last ones
    descending = singular_values.flip(0).cumsum(0)
    kept = int((descending < KEEP * descending[-1]).sum()) + 1
    top = vectors[:, vectors.shape[1] - kept :]
    return (centred @ (top / singular_values[-kept:]) if features else top).to(torch.float32)


def nudge(model: nn.Module, generator: torch.Generator) -> None:
    """A small random step on every weight (a stand-in for training between two measurements)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))


def measurement_cell(width: int, depth: int, probe_size: int, repeats: int) -> tuple[Seconds, Seconds]:
    """Median seconds of a measurement and of its floor, alternated on one MLP.

    ``repeats`` times, or more for fast cells (up to 25, about 0.3 s of measuring), whose medians move most.
    """
    model, layers = mlp(width, depth)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    probe = torch.randn(probe_size, width, generator=generator)
    monitor = SVCCAMonitor(model, probe=probe, layers=layers, reference=("previous", "final"))
    monitor.start()
    nudge(model, generator)
    warm_up = timed(lambda: monitor.measure(epoch=1, step=1))  # the first comparison
    previous: dict[str, Tensor] = {}
    floor(model, probe, layers, previous)
    measured, floors = [], []
    for epoch in range(2, 2 + max(repeats, min(25, int(0.3 / max(warm_up.cpu, 1e-6))))):
        nudge(model, generator)
        floors.append(timed(lambda: floor(model, probe, layers, previous)))
        measured.append(timed(lambda epoch=epoch: monitor.measure(epoch=epoch, step=epoch)))
    monitor.close()
    return median(measured), median(floors)


def measurement_table(
    widths: list[int], depths: list[int], probe_size: int, big_probe: int, repeats: int, max_cost: float
) -> None:
    """Print measurement and floor seconds (wall, CPU) and their ratios for each width and depth.

    Cells whose ``width**2 * layers`` passes ``max_cost`` are left out (the forward passes and ``eigh`` of a single
    thread would take minutes).
    """
    setting = f"probe {probe_size}; {big_probe} at width 4096; medians of {repeats} or more runs"
    print(f"measurement vs floor (MLP, ReLU layers, {setting})")
    header = f"{'width':>6} {'layers':>6} {'probe':>6}  {'measure s':>9} {'floor s':>8} {'ratio':>6}"
    print(f"{header}  {'cpu meas':>8} {'cpu floor':>9} {'cpu ratio':>9}")
    for width in widths:
        for depth in depths:
            if width * width * depth > max_cost:
                continue  # e.g. 32 layers of 1024: minutes of forward passes and eigh on one thread
            size = big_probe if width >= 4096 else probe_size
            measured, floored = measurement_cell(width, depth, size, repeats)
            print(
                f"{width:>6} {depth:>6} {size:>6}  {measured.wall:>9.4f} {floored.wall:>8.4f}"
                f" {measured.wall / floored.wall:>6.2f}  {measured.cpu:>8.4f} {floored.cpu:>9.4f}"
                f" {measured.cpu / max(floored.cpu, 1e-9):>9.2f}"
            )
    print()


def svcca_table(sizes: list[tuple[int, int]], repeats: int) -> None:
    """Print :func:`~lightning_svcca.svcca` (``keep=0.99``) over its three-Gram floor, alternated, medians."""
    print(
        f"svcca vs its three-Gram floor (X^T X, Y^T Y, X^T Y, float64; benchmarks/similarity.py; medians of {repeats})"
    )
    print(f"{'n':>6} {'d':>5}  {'svcca s':>8} {'floor s':>8} {'ratio':>6}  {'cpu ratio':>9}")
    for n, d in sizes:
        x, y = make_data(n, d, "cpu")
        svcca(x, y, keep=KEEP), three_grams(x, y)  # warm-up
        measured, floored = [], []
        for _ in range(repeats):
            floored.append(timed(lambda x=x, y=y: three_grams(x, y)))
            measured.append(timed(lambda x=x, y=y: svcca(x, y, keep=KEEP)))
        m, f = median(measured), median(floored)
        print(
            f"{n:>6} {d:>5}  {m.wall:>8.4f} {f.wall:>8.4f} {m.wall / f.wall:>6.2f}  {m.cpu / f.cpu:>9.2f}"
            f"  (n/d = {n / d:.0f}; target <= 1.2)"
        )
    print()


def fit_seconds(workload, epochs: int, with_callback: bool, root: str) -> Seconds:
    """Seconds of a whole fit (Trainer built, ``epochs`` epochs), with or without the callback."""
    return timed(lambda: fit_run(workload, epochs, with_callback, root))


def overhead_ratio(samples: int, probe_size: int, epochs: int, repeats: int) -> None:
    """Print the fit time with the callback over the time without it (runs alternating), wall and CPU."""
    workload = synthetic_workload(samples, probe_size)
    without, with_ = [], []
    with tempfile.TemporaryDirectory() as root:
        fit_seconds(workload, 1, False, root)  # warm-up: imports, first allocations
        for _ in range(repeats):
            without.append(fit_seconds(workload, epochs, False, root))
            with_.append(fit_seconds(workload, epochs, True, root))
    base, monitored = median(without), median(with_)
    print(f"fit overhead: {samples} samples, 6 layers, probe {probe_size}, {epochs} epochs, previous + final")
    print(f"  fit without callback : {base.wall:7.2f} s wall  {base.cpu:7.2f} s cpu  (median of {repeats})")
    print(f"  fit with callback    : {monitored.wall:7.2f} s wall  {monitored.cpu:7.2f} s cpu")
    print(
        f"  overhead ratio       : {monitored.wall / base.wall:7.3f} wall  {monitored.cpu / base.cpu:7.3f} cpu"
        "  (target <= 1.15)"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, print the measurement/floor table and the fit overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid and a small fit (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements (and fits) per setting")
    parser.add_argument("--full", action="store_true", help="also 1024 x 32, 4096 x 8 and 4096 x 32 (slow)")
    parser.add_argument("--skip-fit", action="store_true", help="only the measurement/floor table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the Trainer's banners, between the lines of the table
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    if args.quick:
        measurement_table([64, 256], [1, 4], 256, 256, 2, math.inf)
        svcca_table([(1000, 100)], 2)
        sample_table([(256, 64)], 2)
        if not args.skip_fit:
            overhead_ratio(512, 128, 2, 1)
        return
    max_cost = math.inf if args.full else 4096**2
    measurement_table([64, 256, 1024, 4096], [1, 8, 32], 1024, 256, args.repeats, max_cost)
    svcca_table([(5000, 512)], max(args.repeats, 5))
    sample_table([(1024, 256), (4096, 256), (4096, 64)], args.repeats)
    if not args.skip_fit:
        overhead_ratio(20000, 1024, 3, args.repeats)


if __name__ == "__main__":
    main()
