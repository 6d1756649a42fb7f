"""Values and speed of lightning_svcca against other implementations, on the same data in one run.

Peers, each skipped with a message when it is not installed (none is a dependency of this package):

- scipy: ``scipy.linalg.subspace_angles`` (principal angles: cosines are the canonical correlations);
- anatome (``pip install anatome``): ``svcca_distance``, ``pwcca_distance``, ``linear_cka_distance`` (values are
  ``1 - distance``);
- cca-zoo (``pip install cca-zoo``): linear ``CCA`` fitted with all directions, its mean in-sample correlation;
- google/svcca's ``cca_core.py``: not on PyPI; point ``SVCCA_CCA_CORE`` at a local copy of the file to include
  it (``get_cca_similarity`` on neurons x datapoints arrays, after the SVD truncation of its tutorial).

For each size the data are float64 ``x`` ``(n, d)`` and ``y = x A + noise``. The table gives each peer's value,
ours, their difference, and both times (best of ``--repeats`` after a warm-up call). Peers compute in their own
precision and with their own rank handling, so differences of ``1e-6`` or so are expected; larger ones are
definitional (e.g. a peer averaging over ``d`` rather than over the numerical rank).

Run ``python benchmarks/peers.py`` (``--quick``: one small size, a smoke test of a few seconds).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lightning_svcca.measures import cca, linear_cka, pwcca, r2cca, rbf_cka, svcca

KEEP = 0.99
SIZES = [(2000, 64), (5000, 256)]
QUICK_SIZES = [(200, 16)]

OURS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "svcca": lambda x, y: svcca(x, y, keep=KEEP),
    "cca": lambda x, y: cca(x, y).mean(),
    "pwcca": pwcca,
    "pwcca_symmetric": lambda x, y: (pwcca(x, y) + pwcca(y, x)) / 2,
    "r2cca": r2cca,
    "linear_cka": linear_cka,
    "rbf_cka": rbf_cka,
}


def make_data(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.linspace(2.0, 0.2, d, dtype=torch.float64)
    a = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return x, x @ a + 0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)


def best_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    value = function()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best, value


# ----------------------------------------------------------------------------------------------------------------
# Peers: each returns {measure: callable(x_numpy, y_numpy) -> float}, or a reason it is skipped.
# ----------------------------------------------------------------------------------------------------------------


def scipy_peer() -> dict[str, Callable] | str:
    try:
        from scipy.linalg import subspace_angles
    except ImportError:
        return "scipy is not installed"
    return {"cca": lambda x, y: float(np.cos(subspace_angles(x - x.mean(0), y - y.mean(0))).mean())}


def anatome_peer() -> dict[str, Callable] | str:
    module = None
    for name in ("anatome.similarity", "anatome.distance"):
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    if module is None:
        return "anatome is not installed (pip install anatome)"

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x), torch.from_numpy(y)

    return {
        "svcca": lambda x, y: 1.0 - float(module.svcca_distance(*tensors(x, y), KEEP, "svd")),
        "pwcca": lambda x, y: 1.0 - float(module.pwcca_distance(*tensors(x, y), "svd")),
        "linear_cka": lambda x, y: 1.0 - float(module.linear_cka_distance(*tensors(x, y), False)),
    }


def cca_zoo_peer() -> dict[str, Callable] | str:
    try:
        from cca_zoo.linear import CCA
    except ImportError:
        try:
            from cca_zoo.models import CCA
        except ImportError:
            return "cca-zoo is not installed (pip install cca-zoo)"

    def mean_correlation(x: np.ndarray, y: np.ndarray) -> float:
        k = min(x.shape[1], y.shape[1])
        try:  # cca-zoo 4 (scikit-learn style)
            model = CCA(n_components=k).fit([x, y])
        except TypeError:  # cca-zoo 2
            model = CCA(latent_dims=k).fit((x, y))
        return float(np.mean(model.score([x, y])))

    return {"cca": mean_correlation}


def repsim_peer() -> dict[str, Callable] | str:
    try:
        import repsim
    except ImportError:
        return "repsim is not installed (pip install repsim)"

    def pair(function: Callable, **options: Any) -> Callable:
        return lambda x, y: float(function([x, y], **options)[0, 1])

    return {
        "cca": pair(repsim.cca, summary_type="pillai"),  # Pillai's trace / d: the mean canonical correlation
        "r2cca": pair(repsim.cca, summary_type="yanai"),  # Yanai's GCD: the mean squared canonical correlation
        "pwcca_symmetric": pair(repsim.pwcca),  # repsim averages PWCCA over both directions
        "linear_cka": pair(repsim.cka, kernel_type="linear", estimator="gretton"),
        "rbf_cka": pair(repsim.cka, kernel_type="rbf", estimator="gretton"),
    }


def ckatorch_peer() -> dict[str, Callable] | str:
    try:
        import ckatorch
    except ImportError:
        return "ckatorch is not installed (pip install ckatorch)"
    return {"linear_cka": lambda x, y: float(ckatorch.cka_base(torch.from_numpy(x), torch.from_numpy(y)))}


def google_peer() -> dict[str, Callable] | str:
    path = os.environ.get("SVCCA_CCA_CORE")
    if not path:
        return "google/svcca is not on PyPI: set SVCCA_CCA_CORE=/path/to/cca_core.py to include it"
    spec = importlib.util.spec_from_file_location("cca_core", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        return f"SVCCA_CCA_CORE={path} is not a readable cca_core.py"
    cca_core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cca_core)

    def correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = cca_core.get_cca_similarity(x.T, y.T, epsilon=0.0, verbose=False)
        return np.asarray(result["cca_coef1"])

    def truncated(a: np.ndarray) -> np.ndarray:
        # the tutorial's SVCCA: centre, SVD, keep the directions reaching KEEP of the singular value sum
        centred = a - a.mean(0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        kept = int(np.argmax(np.cumsum(s) >= KEEP * s.sum())) + 1
        return u[:, :kept] * s[:kept]

    return {
        "cca": lambda x, y: float(correlations(x, y).mean()),
        "svcca": lambda x, y: float(correlations(truncated(x), truncated(y)).mean()),
    }


PEERS = {
    "scipy": scipy_peer,
    "anatome": anatome_peer,
    "cca-zoo": cca_zoo_peer,
    "repsim": repsim_peer,
    "ckatorch": ckatorch_peer,
    "google/svcca": google_peer,
}


def run(sizes: list[tuple[int, int]], repeats: int) -> None:
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, float64")
    available = {}
    for name, factory in PEERS.items():
        peer = factory()
        if isinstance(peer, str):
            print(f"skipped {name}: {peer}")
        else:
            available[name] = peer
    header = (
        f"{'n':>6} {'d':>4}  {'peer':<13} {'measure':<11} {'peer value':>11} {'ours':>9} {'|diff|':>8}"
        f" {'peer ms':>9} {'ours ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for n, d in sizes:
        x, y = make_data(n, d)
        x_np, y_np = x.numpy(), y.numpy()
        ours = {measure: best_time(lambda f=f, x=x, y=y: f(x, y), repeats) for measure, f in OURS.items()}
        for name, peer in available.items():
            for measure, function in peer.items():
                try:
                    peer_time, value = best_time(lambda f=function, a=x_np, b=y_np: f(a, b), repeats)
                except Exception as error:  # noqa: BLE001 - a peer's API drift is reported, not fatal
                    print(f"{n:>6} {d:>4}  {name:<13} {measure:<11} failed: {type(error).__name__}: {error}")
                    continue
                our_time, our_value = ours[measure]
                print(
                    f"{n:>6} {d:>4}  {name:<13} {measure:<11} {value:>11.6f} {float(our_value):>9.6f}"
                    f" {abs(value - float(our_value)):>8.1e} {1e3 * peer_time:>9.1f} {1e3 * our_time:>8.1f}"
                )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the comparison with every installed peer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: one small size, one timed call")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3, quick 1)")
    args = parser.parse_args(argv)
    run(QUICK_SIZES if args.quick else SIZES, args.repeats or (1 if args.quick else 3))


if __name__ == "__main__":
    main()
