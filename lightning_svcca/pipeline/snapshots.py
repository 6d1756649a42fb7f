"""Per-layer, per-epoch snapshots: what later comparisons need of a representation, not the representation.

A :class:`Snapshot` is the orthonormal basis ``U`` of a layer's centred activations on the probe (float32,
``(datapoints, kept directions)``), its singular values, and, only when PWCCA is measured, the right singular
vectors. Memory grows with the kept directions, not with the layer width. Every comparison is then a product
``Ua^T Ub`` of two stored bases (:func:`cross_products`), and every measure follows from it
(:func:`measure`).

Snapshots are built from the rows one process holds (:func:`build_snapshot`): statistics are summed through a
:class:`Collective`, so a probe sharded over DDP ranks gives the same snapshot on every rank as one process
would. :class:`SnapshotStore` keeps them within a memory budget, spilling the least recently used ones to
files.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from lightning_svcca.measures.heldout import cca_heldout, pwcca_heldout, svcca_heldout
from lightning_svcca.measures.similarity import (
    Decomposition,
    ZeroVarianceError,
    _cka_from_cross,
    _correlations,
    _debiased_cka_from_cross,
    _decompose_checked,
    _fix_signs,
    _kept_count,
    _noise_floor,
    _procrustes_from_cross,
    _pwcca_from_cross,
    _raise_if_not_finite,
    _rank_mask,
    _rbf_cka_from_rows,
    _spectrum_from_gram,
    _zero_variance_message,
)
from lightning_svcca.pipeline.safe_files import (
    UnreadableFileError,
    load_snapshot_state,
    report_unreadable,
    save_atomically,
    try_write,
)

__all__ = [
    "METRICS",
    "Collective",
    "LocalCollective",
    "Snapshot",
    "SnapshotStore",
    "build_snapshot",
    "cross_products",
    "evaluate",
    "measure",
    "snapshot_needs",
]

#: Every metric a snapshot comparison can compute. The in-sample CCA family (svcca, pwcca, cca, r2cca) and the
#: variance-weighted measures (linear_cka, linear_cka_debiased, procrustes) follow from the cross product of two
#: stored bases; rbf_cka and the held-out measures need the datapoints themselves, which a full-rank snapshot
#: gives up to a rotation (``U diag(s) = Xc V``: distances, and CCA fits, do not see the rotation).
METRICS = (
    "svcca",
    "pwcca",
    "cca",
    "linear_cka",
    "r2cca",
    "procrustes",
    "linear_cka_debiased",
    "rbf_cka",
    "cca_heldout",
    "svcca_heldout",
    "pwcca_heldout",
)
#: Metrics computed from the snapshots' rows rather than from ``Ua^T Ub``.
_ROW_METRICS = ("rbf_cka", "cca_heldout", "svcca_heldout", "pwcca_heldout")
#: Metrics that need the right singular vectors (weights from neurons).
_RIGHT_METRICS = ("pwcca", "pwcca_heldout")


def snapshot_needs(metrics: Sequence[str]) -> tuple[bool, bool]:
    """What :func:`build_snapshot` must store for ``metrics``: ``(full_rank, with_right)``.

    Only ``"svcca"`` can do with the SVCCA-kept directions; every other metric needs all directions
    (``full_rank``). ``"pwcca"`` and ``"pwcca_heldout"`` weight by neurons, so they need the right singular
    vectors (``with_right``).

    Raises:
        ValueError: an unknown metric.

    Example:
        >>> snapshot_needs(["svcca"]), snapshot_needs(["svcca", "linear_cka"]), snapshot_needs(["pwcca"])
        ((False, False), (True, False), (True, True))
    """
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRICS}")
    return any(metric != "svcca" for metric in metrics), any(metric in _RIGHT_METRICS for metric in metrics)


#: Rows converted to float64 at a time while accumulating a Gram matrix (bounds the float64 working copy).
_ROW_BLOCK = 8192


class Collective(Protocol):
    """The two collectives a sharded probe needs; every process calls them in the same order."""

    rank: int
    world_size: int

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over processes (all of them get the result)."""

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Concatenate every process's rows, in rank order (row counts may differ)."""


class LocalCollective:
    """The single-process collective: sums and gathers are the identity."""

    rank = 0
    world_size = 1

    def sum(self, tensor: Tensor) -> Tensor:
        """Return ``tensor``."""
        return tensor

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Return ``tensor``."""
        return tensor


@dataclass(frozen=True)
class Snapshot:
    """The compressed representation of one layer on the probe.

    Attributes:
        left: ``(n_datapoints, r)`` float32 orthonormal basis ``U`` of the centred activations, leading
            directions first.
        singular_values: ``(r,)`` float64 singular values, descending.
        right: ``(n_features, r)`` float32 right singular vectors, kept only for PWCCA (weights from neurons).
        kept: directions SVCCA keeps at the run's ``keep``, the layer's intrinsic dimensionality.
        rank: numerical rank of the activations (``r`` when all directions are stored).
        n_features: width of the layer.
    """

    left: Tensor
    singular_values: Tensor
    right: Tensor | None
    kept: int
    rank: int
    n_features: int

    @property
    def n_datapoints(self) -> int:
        """Number of datapoints (rows) of the probe representation."""
        return int(self.left.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage."""
        tensors = (self.left, self.singular_values, self.right)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def decomposition(self, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Decomposition:
        """The snapshot as a :class:`~lightning_svcca.measures.similarity.Decomposition`, for the public measures."""
        right = None if self.right is None else self.right.to(device=device, dtype=dtype)
        return Decomposition(
            singular_values=self.singular_values.to(device=device, dtype=dtype),
            right=right,
            left=self.left.to(device=device, dtype=dtype),
            data=None,
            mean=None,
            n_datapoints=self.n_datapoints,
            n_features=self.n_features,
        )

    def to_state(self) -> dict[str, Tensor | int | None]:
        """Plain dict for checkpoints and spill files."""
        return {
            "left": self.left,
            "singular_values": self.singular_values,
            "right": self.right,
            "kept": self.kept,
            "rank": self.rank,
            "n_features": self.n_features,
        }

    @classmethod
    def from_state(cls, state: dict) -> Snapshot:
        """Inverse of :meth:`to_state`."""
        return cls(
            state["left"],
            state["singular_values"],
            state.get("right"),
            int(state["kept"]),
            int(state["rank"]),
            int(state["n_features"]),
        )


def build_snapshot(
    rows: Tensor,
    collective: Collective,
    *,
    name: str,
    keep: float | int,
    keep_by: str,
    full_rank: bool,
    with_right: bool,
    input_eps: float,
    dtype: torch.dtype = torch.float64,
) -> Snapshot:
    """Decompose a layer's activations, held as row shards across processes, into a :class:`Snapshot`.

    With at least as many datapoints as features: 1. centre with the global mean, 2. sum the centred Gram
    matrices of all shards, 3. eigendecompose it (identically on every process), 4. ``U = Xc V / s`` shard by
    shard, gathered. With fewer datapoints than features the rows are gathered and one thin SVD is taken.

    Args:
        rows: this process's ``(rows, features)`` activations.
        collective: sums and gathers across processes (:class:`LocalCollective` for one process).
        name: the layer, for messages.
        keep: SVCCA's ``keep`` (fraction or number of directions).
        keep_by: ``"singular_values"`` or ``"variance"``.
        full_rank: store every direction (CCA, PWCCA and CKA need them); otherwise only the ``kept`` ones.
        with_right: store the right singular vectors (PWCCA).
        input_eps: rounding level of the activations' original dtype (for the rank cut).
        dtype: precision of the accumulation and decomposition.

    Raises:
        ValueError: NaN or Inf activations on any process.
        ZeroVarianceError: the layer's activations do not vary (a dead layer).
    """
    device = rows.device
    n_features = rows.shape[1]
    # 1. global count and mean (one collective); a NaN or Inf anywhere makes the sum non-finite everywhere.
    totals = collective.sum(torch.cat([rows.new_tensor([rows.shape[0]], dtype=dtype), rows.sum(0, dtype=dtype)]))
    n, mean = int(totals[0]), totals[1:] / totals[0]
    if not bool(torch.isfinite(mean).all()):
        if not bool(torch.isfinite(rows).all()):
            _raise_if_not_finite(rows, f"layer {name!r}")
        raise ValueError(f"layer {name!r} produced NaN or Inf activations on another process")
    if n < 2:
        raise ValueError(f"layer {name!r} gave {n} datapoint(s); a probe needs at least 2")
    if n < n_features:
        decomposition = _decompose_checked(collective.gather_rows(rows), f"layer {name!r}", dtype, input_eps)
        singular_values, right, left = decomposition.singular_values, decomposition.right, decomposition.left
    else:
        # 2. centred Gram matrix, accumulated in float64 a block of rows at a time, summed over processes.
        gram = torch.zeros(n_features, n_features, dtype=dtype, device=device)
        for block in rows.split(_ROW_BLOCK):
            centred = block.to(dtype) - mean
            gram.addmm_(centred.T, centred)
        gram = collective.sum(gram)
        floor = _noise_floor(float(gram.diagonal().sum()), n * float(mean.square().sum()), n, input_eps, dtype)
        # 3. eigendecomposition Xc^T Xc = V diag(s^2) V^T, cut to numerical rank.
        singular_values, right = _spectrum_from_gram(*torch.linalg.eigh(gram))
        mask = _rank_mask(singular_values, floor, n, n_features, gram=True)
        if not bool(mask.any()):
            raise ZeroVarianceError(_zero_variance_message(f"layer {name!r}"))
        singular_values, right = singular_values[mask], _fix_signs(right[:, mask])
        # 4. U = Xc V diag(1/s), this shard's rows, then every shard's.
        whiten = right / singular_values
        local = torch.cat([(block.to(dtype) - mean) @ whiten for block in rows.split(_ROW_BLOCK)] or [whiten[:0]])
        left = collective.gather_rows(local.to(torch.float32))
    rank = int(singular_values.shape[0])
    kept = _kept_count(singular_values, keep, keep_by)
    stored = rank if full_rank else kept
    return Snapshot(
        left=left[:, :stored].to(torch.float32).contiguous().cpu(),
        singular_values=singular_values[:stored].to(torch.float64).cpu(),
        right=right[:, :stored].to(torch.float32).contiguous().cpu() if with_right else None,
        kept=kept,
        rank=rank,
        n_features=n_features,
    )


@dataclass(frozen=True)
class Pair:
    """Two snapshots to compare, with how many leading directions of each to use.

    ``shuffle`` permutes the datapoints of ``b`` (the noise baseline).
    """

    a: Snapshot
    b: Snapshot
    kept_a: int
    kept_b: int
    shuffle: Tensor | None = None


def cross_products(
    pairs: Sequence[Pair], collective: Collective, *, device: torch.device, dtype: torch.dtype = torch.float64
) -> list[Tensor]:
    """``Ua^T Ub`` for every pair, each process summing over its share of the rows, in one collective.

    The stored bases are float32 and their products are taken in float32, then returned in ``dtype``: their
    rounding (measured: below 5e-8 in the correlations at n = 32768) stays under the float32 storage error
    itself, and the products run twice as fast as in float64 with no copies. Each basis goes to ``device``
    once per pair group (a few recent ones are kept there).
    """
    if not pairs:
        return []
    for pair in pairs:
        if pair.a.n_datapoints != pair.b.n_datapoints:
            raise ValueError(
                f"cannot compare snapshots over {pair.a.n_datapoints} and {pair.b.n_datapoints} datapoints: a"
                " reference must see the same probe datapoints"
            )
    n = pairs[0].a.n_datapoints
    start, stop = n * collective.rank // collective.world_size, n * (collective.rank + 1) // collective.world_size
    recent: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def rows(snapshot: Snapshot, shuffle: Tensor | None = None) -> Tensor:
        """This process's rows of a basis (of its shuffled datapoints), on the device."""
        key = (id(snapshot), id(shuffle))
        if key not in recent:
            index = slice(start, stop) if shuffle is None else shuffle[start:stop]
            recent[key] = snapshot.left[index].to(device=device)
            if len(recent) > 4:
                recent.popitem(last=False)
        return recent[key]

    partials = [
        (rows(pair.a)[:, : pair.kept_a].T @ rows(pair.b, pair.shuffle)[:, : pair.kept_b]).to(dtype) for pair in pairs
    ]
    summed = collective.sum(torch.cat([partial.reshape(-1) for partial in partials]))
    products, offset = [], 0
    for partial in partials:
        products.append(summed[offset : offset + partial.numel()].reshape(partial.shape))
        offset += partial.numel()
    return products


def pair_for(metric: str, a: Snapshot, b: Snapshot, shuffle: Tensor | None = None) -> Pair:
    """The pair of bases ``metric`` needs: the SVCCA-kept directions, or all stored ones."""
    if metric == "svcca":
        return Pair(a, b, min(a.kept, a.left.shape[1]), min(b.kept, b.left.shape[1]), shuffle)
    return Pair(a, b, a.left.shape[1], b.left.shape[1], shuffle)


def measure(metric: str, pair: Pair, cross: Tensor) -> float:
    """The value of ``metric`` for a pair, from its cross product ``Ua^T Ub`` (or the snapshots' rows).

    The held-out metrics use their functions' defaults (5 folds, seed 0, ridge picked on a dev part) on the
    rows ``U diag(s)`` (``U diag(s) V^T``, the centred activations, for ``pwcca_heldout``).
    """
    if metric in ("svcca", "cca"):
        return float(_correlations(cross).mean())
    if metric == "r2cca":
        return float(cross.square().sum() / min(cross.shape))
    if metric in _ROW_METRICS:
        return _measure_rows(metric, pair, cross)
    a, b = _spectrum(pair.a, cross), _spectrum(pair.b, cross)
    if metric == "pwcca":
        return float(_pwcca_from_cross(a, cross))
    if metric == "linear_cka":
        return float(_cka_from_cross(a, b, cross))
    if metric == "procrustes":
        return float(_procrustes_from_cross(a, b, cross))
    if metric == "linear_cka_debiased":
        a, b = _with_rows(pair.a, None, cross), _with_rows(pair.b, pair.shuffle, cross)
        return float(_debiased_cka_from_cross(a, b, cross))
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def _with_rows(snapshot: Snapshot, shuffle: Tensor | None, like: Tensor) -> Decomposition:
    """A snapshot as a decomposition with its basis (datapoints permuted by ``shuffle``), on ``like``'s device."""
    left = snapshot.left if shuffle is None else snapshot.left[shuffle.to(snapshot.left.device)]
    return Decomposition(
        snapshot.singular_values.to(device=like.device, dtype=like.dtype),
        None,
        left.to(device=like.device, dtype=like.dtype),
        None,
        None,
        snapshot.n_datapoints,
        snapshot.n_features,
    )


def _measure_rows(metric: str, pair: Pair, cross: Tensor) -> float:
    """Metrics that need the datapoints: from ``U diag(s)`` (full-rank snapshots) of each side."""
    for snapshot in (pair.a, pair.b):
        if snapshot.left.shape[1] < snapshot.rank:
            raise ValueError(f"{metric} needs full-rank snapshots; build them with snapshot_needs(metrics)")
    rows_a = _with_rows(pair.a, None, cross)
    rows_b = _with_rows(pair.b, pair.shuffle, cross)
    x = rows_a.left * rows_a.singular_values
    y = rows_b.left * rows_b.singular_values
    if metric == "rbf_cka":
        return float(_rbf_cka_from_rows(x, y, 1.0))
    if metric == "cca_heldout":
        return float(cca_heldout(x, y).mean())
    if metric == "svcca_heldout":
        # the run's keep is applied through the stored count of kept directions
        return float(svcca_heldout(x[:, : pair.a.kept], y[:, : pair.b.kept], keep=1.0))
    if pair.a.right is None:
        raise ValueError("pwcca_heldout needs the right singular vectors; build snapshots with with_right=True")
    return float(pwcca_heldout(x @ pair.a.right.to(x).T, y))


def _spectrum(snapshot: Snapshot, like: Tensor) -> Decomposition:
    """The singular values and right vectors of a snapshot as a basis-free decomposition, on ``like``'s device."""
    right = None if snapshot.right is None else snapshot.right.to(device=like.device, dtype=like.dtype)
    singular_values = snapshot.singular_values.to(device=like.device, dtype=like.dtype)
    return Decomposition(singular_values, right, None, None, None, snapshot.n_datapoints, snapshot.n_features)


def evaluate(
    jobs: Sequence[tuple[str, Pair]],
    collective: Collective,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """The value of each ``(metric, pair)``: every distinct cross product once, all in one collective.

    This is how a snapshot is compared with many references at once, and how the "final" pass compares every
    stored epoch with the last one: no decomposition is recomputed, and metrics that need the same directions
    (cca, pwcca, linear_cka) share one product.
    """
    slots: dict[tuple[int, int, int, int, int], int] = {}
    pairs: list[Pair] = []
    for _, pair in jobs:
        key = _pair_key(pair)
        if key not in slots:
            slots[key] = len(pairs)
            pairs.append(pair)
    products = cross_products(pairs, collective, device=device, dtype=dtype)
    return [measure(metric, pair, products[slots[_pair_key(pair)]]) for metric, pair in jobs]


def _pair_key(pair: Pair) -> tuple[int, int, int, int, int]:
    return (id(pair.a), id(pair.b), pair.kept_a, pair.kept_b, id(pair.shuffle))


class SnapshotStore:
    """Snapshots by ``(layer, tag)``, with at most ``max_bytes`` of them in memory.

    Two modes:

    * **persistent** (``directory`` given: the run's folder, beside its event files): every snapshot is written to
      a file when stored, the memory holds the most recently used ones within the budget, and :meth:`state_dict`
      holds file names only, so a checkpoint stays small however long the run. Files are never deleted by the
      store: checkpoints of the run may need them; they go with the run's folder.
    * **in memory** (``directory=None``): beyond the budget the least recently used snapshots spill to a temporary
      folder (deleted by :meth:`close`), and :meth:`state_dict` holds the tensors themselves.

    Args:
        max_bytes: budget for snapshots held in memory (``None``: unbounded).
        directory: the persistent folder, or ``None``.
    """

    def __init__(self, max_bytes: int | None, directory: Path | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_snapshot_bytes must be >= 0 or None, got {max_bytes}")
        self.max_bytes = max_bytes
        self.directory = None if directory is None else Path(directory)
        self._spill_dir: Path | None = None
        self._memory: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()
        self._files: dict[tuple[str, str], Path] = {}
        self._failed: set[Path] = set()  # folders a write failed in (warned once)

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory now (a snapshot stored under several keys counts once)."""
        return sum(snapshot.nbytes for snapshot in {id(s): s for s in self._memory.values()}.values())

    @property
    def spill_dir(self) -> Path | None:
        """Where snapshots not held in memory live (the persistent folder, or the temporary spill folder)."""
        return self.directory if self.directory is not None and self._files else self._spill_dir

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._memory or key in self._files

    def keys(self) -> list[tuple[str, str]]:
        """Every stored key, in memory or in a file."""
        return list(dict.fromkeys([*self._memory, *self._files]))

    def put(self, key: tuple[str, str], snapshot: Snapshot) -> None:
        """Store (or replace) a snapshot (written to its file in persistent mode), then hold the budget."""
        self.discard(key)
        if self.directory is not None:
            self._write_persistent(key, snapshot)
        self._memory[key] = snapshot
        self._enforce_budget()

    def alias(self, key: tuple[str, str], existing: tuple[str, str]) -> None:
        """Store under ``key`` the snapshot stored under ``existing``, without a copy.

        The same object in memory, the same file in persistent mode: a frozen layer's snapshot, unchanged since.
        """
        if self.directory is not None and existing in self._files:
            self.discard(key)
            self._files[key] = self._files[existing]
            if existing in self._memory:
                self._memory[key] = self._memory[existing]
            return
        self.put(key, self.get(existing))

    def get(self, key: tuple[str, str]) -> Snapshot:
        """A stored snapshot; one not in memory is memory-mapped from its file, not brought back into memory."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        if key in self._files:
            try:
                return Snapshot.from_state(load_snapshot_state(self._files[key]))
            except UnreadableFileError as error:  # reported once, then forgotten: comparisons needing it skip
                self.discard(key)
                report_unreadable(error, f"snapshot of layer {key[0]!r} at {key[1]}")
                raise KeyError(key) from error
        raise KeyError(key)

    def discard(self, key: tuple[str, str]) -> None:
        """Forget a snapshot (a temporary spill file is deleted; a persistent file stays for older checkpoints)."""
        self._memory.pop(key, None)
        path = self._files.pop(key, None)
        if path is not None and self.directory is None:
            path.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, dict]:
        """Keyed ``"layer@tag"``: the file's name in persistent mode (folder under ``""``), else its tensors."""
        if self.directory is not None:
            state: dict[str, dict] = {"": {"folder": str(self.directory)}}
            for layer, tag in self.keys():
                path = self._files.get((layer, tag))
                if path is None:  # its write failed: the tensors themselves (written again after a resume)
                    state[f"{layer}@{tag}"] = self.get((layer, tag)).to_state()
                    continue
                state[f"{layer}@{tag}"] = {"name": path.name} if path.parent == self.directory else {"file": str(path)}
            return state
        return {f"{layer}@{tag}": self.get((layer, tag)).to_state() for layer, tag in self.keys()}

    def load_state_dict(self, state: dict[str, dict]) -> list[str]:
        """Replace the contents with a :meth:`state_dict` of either mode; returns the keys whose file is gone."""
        for key in self.keys():
            self.discard(key)
        missing = []
        folder = Path(state[""]["folder"]) if "" in state else None
        for joined, entry in state.items():
            if not joined:
                continue
            layer, _, tag = joined.rpartition("@")
            if "file" not in entry and "name" not in entry:
                self.put((layer, tag), Snapshot.from_state(entry))
                continue
            path = Path(entry["file"]) if "file" in entry else folder / entry["name"]  # type: ignore[operator]
            if path.is_file():
                self._files[(layer, tag)] = path
            else:
                missing.append(joined)
        return missing

    def persist_to(self, directory: Path) -> None:
        """Switch to persistent mode in ``directory``; snapshots held only in memory are written there."""
        self.directory = Path(directory)
        for key, snapshot in self._memory.items():
            if key not in self._files:
                self._write_persistent(key, snapshot)

    def close(self) -> None:
        """Release memory-mapped files and delete the temporary spill folder; persistent files and memory stay."""
        if self.directory is None:
            self._files.clear()
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def _enforce_budget(self) -> None:
        if self.max_bytes is None:
            return
        while self._memory and self.memory_bytes > self.max_bytes:
            key, snapshot = self._memory.popitem(last=False)
            if key not in self._files:
                if self._spill_dir is None:
                    self._spill_dir = Path(tempfile.mkdtemp(prefix="svcca_spill_"))
                path = try_write(
                    self._write, self._spill_dir, key, snapshot, where=self._spill_dir, warned=self._failed
                )
                if path is None:  # no room on disk either: it stays in memory
                    self._memory[key] = snapshot
                    self._memory.move_to_end(key, last=False)
                    return
                self._files[key] = path

    @staticmethod
    def _write(folder: Path, key: tuple[str, str], snapshot: Snapshot) -> Path:
        """Write a snapshot to ``folder`` atomically (a unique temporary name, then a rename)."""
        folder.mkdir(parents=True, exist_ok=True)
        layer, tag = key
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{layer}@{tag}")[:80]
        path = folder / f"{safe}-{zlib.crc32(f'{layer}@{tag}'.encode()):08x}.pt"
        return save_atomically(snapshot.to_state(), path)

    def _write_persistent(self, key: tuple[str, str], snapshot: Snapshot) -> None:
        """Write to the persistent folder; when that fails (warned once) the snapshot is kept in memory only."""
        assert self.directory is not None
        path = try_write(self._write, self.directory, key, snapshot, where=self.directory, warned=self._failed)
        if path is not None:
            self._files[key] = path
