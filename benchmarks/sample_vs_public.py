"""The sample-level measures against the public implementations one can install: values and seconds.

* mutual k-NN: ``platonic-universe``'s ``pu.metrics.mknn`` (scikit-learn ``NearestNeighbors``, cosine metric),
  and the Platonic Representation Hypothesis reference recipe (``minyoungg/platonic-rep``, not on PyPI) re-run
  from its description: ``F.normalize`` the features, inner products, diagonal set low, ``argsort``, shared
  fraction.
* CKNNA: that reference recipe (``unbiased=True``): masks from ``topk``, ``hsic_unbiased`` with its
  ``torch.mm(K~, L~)`` (``O(n^3)``), ``+ 1e-6`` in the denominator.
* minibatch CKA: ``torch-cka`` (PyTorch-Model-Compare, ``torch_cka.CKA._HSIC``: float32 kernels of uncentred
  features, diagonals zeroed, summed over batches).
* RSA: ``rsatoolbox`` (``compare(..., method="rho-a")`` / ``"corr"`` on RDMs from ``calc_rdm(method="correlation")``)
  and scipy (``pdist`` + ``spearmanr``).

Each public package is optional: one that does not import is reported and skipped. Install them beside the
package, e.g. ``pip install --target /tmp/ext torch-cka platonic-universe rsatoolbox`` and run with
``PYTHONPATH=/tmp/ext``. One thread, float64 for ours (torch-cka computes in float32, as it does).

Run: ``python benchmarks/sample_vs_public.py [--n 1024] [--d 256]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from torch.nn import functional

from lightning_svcca import cknna, minibatch_cka, mutual_knn, rsa


def _seconds(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def reference_mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The platonic-rep recipe: unit features, inner products, self excluded by a low diagonal, argsort."""
    n = x.shape[0]
    masks = []
    for feats in (functional.normalize(x, dim=-1), functional.normalize(y, dim=-1)):
        nearest = (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]
        masks.append(torch.zeros(n, n, dtype=x.dtype).scatter_(1, nearest, 1.0))
    return float(((masks[0] * masks[1]).sum(dim=1) / k).mean())


def _reference_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    n = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)  # noqa: E741
    value = (k * l.T).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * torch.mm(k, l).sum() / (n - 2)
    return value / (n * (n - 3))


def reference_cknna(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The platonic-rep recipe (unbiased): top-k masks, masked kernels, O(n^3) unbiased HSIC, + 1e-6."""
    fx, fy = functional.normalize(x, dim=-1), functional.normalize(y, dim=-1)
    kx, ky = fx @ fx.T, fy @ fy.T
    n = x.shape[0]

    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        masks = []
        for kernel in (a, b):
            nearest = kernel.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices
            masks.append(torch.zeros(n, n, dtype=x.dtype).scatter_(1, nearest, 1.0))
        mask = masks[0] * masks[1]
        return _reference_hsic(mask * a, mask * b)

    return float(similarity(kx, ky) / (torch.sqrt(similarity(kx, kx) * similarity(ky, ky)) + 1e-6))


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 (any failure means: not available here)
        print(f"  ({name} not available: {type(error).__name__}: {error})")
        return None


def _pu_mknn() -> Callable[..., float] | None:
    """``pu.metrics.mknn`` without importing ``pu`` (its ``__init__`` pulls in dataset loaders)."""
    spec = importlib.util.find_spec("pu")
    if spec is None or not spec.submodule_search_locations:
        print("  (platonic-universe not available)")
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "metrics.py"
    module_spec = importlib.util.spec_from_file_location("pu_metrics", path)
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001
        print(f"  (pu.metrics not importable: {type(error).__name__}: {error})")
        return None
    return module.mknn


def _torch_cka_minibatch(x: torch.Tensor, y: torch.Tensor, batch: int) -> float | None:
    torch_cka = _optional("torch_cka")
    if torch_cka is None:
        return None
    hsic = torch_cka.CKA._HSIC
    holder = type("Holder", (), {"device": "cpu"})()
    sums = np.zeros(3)
    count = x.shape[0] // batch
    for start in range(0, count * batch, batch):
        xs, ys = x[start : start + batch].float(), y[start : start + batch].float()
        kx, ky = (xs @ xs.T).fill_diagonal_(0.0), (ys @ ys.T).fill_diagonal_(0.0)
        sums += [hsic(holder, kx, kx) / count, hsic(holder, kx, ky) / count, hsic(holder, ky, ky) / count]
    return float(sums[1] / (np.sqrt(sums[0]) * np.sqrt(sums[2])))


def _rsatoolbox(x: np.ndarray, y: np.ndarray) -> float | None:
    rsatoolbox = _optional("rsatoolbox")
    if rsatoolbox is None:
        return None
    rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(data), method="correlation") for data in (x, y)]
    return float(rsatoolbox.rdm.compare(rdms[0], rdms[1], method="spearman")[0, 0])


def main(argv: list[str] | None = None) -> None:
    """Print each measure's value and seconds, ours against the public ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=generator, dtype=torch.float64)
    y = torch.relu(x @ torch.randn(args.d, args.d, generator=generator, dtype=torch.float64) + 3.0)
    print(f"n={args.n}, d={args.d}, k={args.k}, batch={args.batch}; y = relu(x W + 3) (a large mean), one thread")
    rows: list[tuple[str, str, Any, float]] = []

    def add(measure: str, implementation: str, function: Callable[[], Any]) -> None:
        value, seconds = _seconds(function)
        if value is not None:
            rows.append((measure, implementation, value, seconds))

    add("mutual_knn", "lightning_svcca", lambda: float(mutual_knn(x, y, k=args.k)))
    add("mutual_knn", "platonic-rep recipe", lambda: reference_mutual_knn(x, y, args.k))
    mknn = _pu_mknn()
    if mknn is not None:
        add("mutual_knn", "platonic-universe mknn", lambda: float(mknn(x.numpy(), y.numpy(), k=args.k)))
    add("cknna", "lightning_svcca", lambda: float(cknna(x, y, k=args.k)))
    add("cknna", "platonic-rep recipe (n^3)", lambda: reference_cknna(x, y, args.k))
    add("minibatch_cka", "lightning_svcca", lambda: float(minibatch_cka(x, y, batch_size=args.batch)))
    add("minibatch_cka", "torch-cka (float32)", lambda: _torch_cka_minibatch(x, y, args.batch))
    add("rsa", "lightning_svcca", lambda: float(rsa(x, y)))
    add(
        "rsa",
        "scipy pdist+spearmanr",
        lambda: float(spearmanr(pdist(x.numpy(), "correlation"), pdist(y.numpy(), "correlation"))[0]),
    )
    add("rsa", "rsatoolbox rho", lambda: _rsatoolbox(x.numpy(), y.numpy()))
    print(f"{'measure':>13}  {'implementation':<27} {'value':>12} {'seconds':>8}")
    for measure, implementation, value, seconds in rows:
        print(f"{measure:>13}  {implementation:<27} {value:>12.8f} {seconds:>8.3f}")


if __name__ == "__main__":
    main()
