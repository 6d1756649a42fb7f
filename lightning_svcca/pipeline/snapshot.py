"""Per-layer, per-epoch snapshots: what later comparisons need of a representation, not the representation.

A :class:`Snapshot` is the orthonormal basis ``U`` of a layer's centred activations on the probe (float32,
``(datapoints, kept directions)``), its singular values, and, only when PWCCA is measured, the right singular
vectors. Memory grows with the kept directions, not with the layer width. Every comparison is then a product
``Ua^T Ub`` of two stored bases (:mod:`~lightning_svcca.pipeline.metrics`).

Snapshots are built from the rows one process holds (:func:`build_snapshot`): statistics are summed through a
:class:`Collective`, so a probe sharded over DDP ranks gives the same snapshot on every rank as one process
would. The decomposition itself is the measures' own (:func:`~lightning_svcca.measures.decompose`'s Gram route,
applied to the summed Gram matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_svcca.measures._checks import raise_if_not_finite
from lightning_svcca.measures._linalg import (
    ROW_BLOCK,
    basis_from_gram,
    centred_gram,
    kept_count,
    upper_gram,
)
from lightning_svcca.measures.decomposition import Decomposition, decompose_checked

__all__ = ["Collective", "LocalCollective", "Snapshot", "build_snapshot"]


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
        affine: ``(2, r + 1)`` float64, what the centring took away, for the measures that need the datapoints
            themselves (cosine neighbours, correlation RDMs): row 0 is ``V^T mu`` and ``|mu|^2`` (the mean
            activation ``mu``), row 1 is ``V^T 1`` and ``mu . 1`` (the all-ones feature vector). ``None`` when
            built without it (``with_affine=False``: no metric of the run needs it) and in snapshots written before
            it existed. See :mod:`~lightning_svcca.pipeline.sample_metrics`.
    """

    left: Tensor
    singular_values: Tensor
    right: Tensor | None
    kept: int
    rank: int
    n_features: int
    affine: Tensor | None = None

    @property
    def n_datapoints(self) -> int:
        """Number of datapoints (rows) of the probe representation."""
        return int(self.left.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage."""
        tensors = (self.left, self.singular_values, self.right, self.affine)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def decomposition(self, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Decomposition:
        """The snapshot as a :class:`~lightning_svcca.measures.Decomposition`, for the public measures."""
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
            "affine": self.affine,
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
            state.get("affine"),
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
    with_affine: bool = True,
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
        with_affine: store :attr:`Snapshot.affine` (the sample-level measures that are not translation-invariant
            need it; :func:`~lightning_svcca.pipeline.metrics.snapshot_needs` says when).

    Raises:
        ValueError: NaN or Inf activations on any process.
        ZeroVarianceError: the layer's activations do not vary (a dead layer).
    """
    n_features = rows.shape[1]
    # 1. global count and mean (one collective); a NaN or Inf anywhere makes the sum non-finite everywhere.
    n, mean = _count_and_mean(rows, collective, dtype)
    if not bool(torch.isfinite(mean).all()):
        if not bool(torch.isfinite(rows).all()):
            raise_if_not_finite(rows, f"layer {name!r}")
        raise ValueError(f"layer {name!r} produced NaN or Inf activations on another process")
    if n < 2:
        raise ValueError(f"layer {name!r} gave {n} datapoint(s); a probe needs at least 2")
    centred: Tensor | None = None
    if n < n_features:
        decomposition = decompose_checked(collective.gather_rows(rows), f"layer {name!r}", dtype, input_eps)
        singular_values, right, left = decomposition.singular_values, decomposition.right, decomposition.left
    else:
        centred, singular_values, right = _gram_basis(rows, mean, n, collective, f"layer {name!r}", input_eps)
        left = None
    rank = int(singular_values.shape[0])
    kept = kept_count(singular_values, keep, keep_by)
    stored = rank if full_rank else kept
    if left is None:
        # 4. U = Xc V diag(1/s), of the stored directions only.
        left = _project(rows, mean, centred, right[:, :stored] / singular_values[:stored], collective)
    # 5. what centring removed, in the stored directions' coordinates (sample-level measures, sample_metrics.py).
    affine = None
    if with_affine:
        sides = torch.stack([mean, torch.ones_like(mean)])  # mu and the all-ones feature vector, one product each
        affine = torch.cat([sides @ right[:, :stored].to(mean.dtype), sides @ mean[:, None]], dim=1)
        affine = affine.to(torch.float64).cpu()
    return Snapshot(
        left=_stored(left[:, :stored], torch.float32),
        singular_values=_stored(singular_values[:stored], torch.float64),
        right=_stored(right[:, :stored], torch.float32) if with_right else None,
        kept=kept,
        rank=rank,
        n_features=n_features,
        affine=affine,
    )


def _stored(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` as a snapshot keeps it: ``dtype``, contiguous, on the CPU (no call when it is already so)."""
    if tensor.dtype == dtype and tensor.device.type == "cpu" and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype).contiguous().cpu()


def _count_and_mean(rows: Tensor, collective: Collective, dtype: torch.dtype) -> tuple[int, Tensor]:
    """The number of rows and their column means over every process (one collective), in ``dtype``."""
    sums = rows.sum(0, dtype=dtype)
    if collective.world_size == 1:
        return rows.shape[0], sums / rows.shape[0]
    totals = collective.sum(torch.cat([sums.new_tensor([rows.shape[0]]), sums]))
    return int(totals[0]), totals[1:] / totals[0]


def _gram_basis(
    rows: Tensor, mean: Tensor, n: int, collective: Collective, name: str, input_eps: float
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Steps 2-3 of :func:`build_snapshot`: ``(Xc, s, V)`` from the centred Gram matrix summed over processes.

    Rows that fit one projection block (:data:`ROW_BLOCK`) are centred once, here, and returned for the projection
    (which materialises that block anyway); longer shards are centred a few MiB at a time (``Xc`` is ``None``).
    """
    centred = _centred(rows, mean) if rows.shape[0] <= ROW_BLOCK else None
    # 2. centred Gram matrix of this shard (in the compute dtype), summed over processes.
    gram = collective.sum(centred_gram(rows, mean) if centred is None else upper_gram(centred))
    # 3. Xc^T Xc = V diag(s^2) V^T, cut to numerical rank: decompose()'s Gram route on the summed matrix.
    singular_values, right = basis_from_gram(gram, mean, n, input_eps, name)
    return centred, singular_values, right


def _project(rows: Tensor, mean: Tensor, centred: Tensor | None, whiten: Tensor, collective: Collective) -> Tensor:
    """``Xc W`` of this shard's rows (``centred``: those rows centred already), then every shard's, float32."""
    blocks = [centred] if centred is not None else (_centred(block, mean) for block in rows.split(ROW_BLOCK))
    parts = [block @ whiten for block in blocks] or [whiten[:0]]
    local = parts[0] if len(parts) == 1 else torch.cat(parts)
    return collective.gather_rows(local.to(torch.float32))


def _centred(block: Tensor, mean: Tensor) -> Tensor:
    """``block - mean`` in ``mean``'s dtype, converting and subtracting in one pass when promotion allows."""
    if torch.result_type(block, mean) == mean.dtype:
        return torch.sub(block, mean)
    return block.to(mean.dtype) - mean
