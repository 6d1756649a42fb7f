"""Which snapshot each layer is compared with, the comparisons themselves, and forgetting what is no longer needed.

Measurements are identified by their *point*: the epoch when measuring per epoch, the global step when measuring
every k steps. A measurement at a point compares every layer's new snapshot with each reference that has one by then
(:meth:`Comparisons.rows_for`): the last measured epoch (``previous``), epoch 0 (``initial``), a fixed model or
features, or a freeze policy's lag. The ``final`` reference is different: every measured epoch is compared with
the latest one (:meth:`Comparisons.against_epoch`), live for the heatmap and once at the end of fit for the
history. Each row is a plain dict (see :func:`row`); rows whose value is not finite are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_svcca.pipeline.references import Reference
from lightning_svcca.pipeline.safe_files import stored_snapshot
from lightning_svcca.pipeline.snapshots import Collective, Pair, Snapshot, SnapshotStore, evaluate, pair_for

__all__ = ["Comparisons", "row", "values_of"]


def row(epoch: int, step: int, layer: str, reference: str, metric: str, value: float) -> dict[str, Any]:
    """One history row: what was measured at ``epoch`` (completed epochs) and global ``step``."""
    return {
        "epoch": int(epoch),
        "step": int(step),
        "layer": layer,
        "reference": reference,
        "metric": metric,
        "value": float(value),
    }


def values_of(rows: Sequence[Mapping[str, Any]], reference: str | None, metric: str) -> dict[str, float]:
    """Layer -> value of the rows of one reference and metric."""
    return {r["layer"]: r["value"] for r in rows if r["reference"] == reference and r["metric"] == metric}


class Comparisons:
    """Compares snapshots held in a :class:`SnapshotStore` with the run's references.

    Args:
        store: epoch snapshots under ``(layer, str(epoch))``, fixed references under ``(layer, name)``.
        references: the references, in the order of the rows.
        metrics: the metrics computed for each pair.
        baseline: also compare each snapshot with itself under a fixed datapoint shuffle (the noise floor).
        measured: the measured epochs so far, in order (shared with the monitor, which appends to it).
        points: ``(epoch, step)`` of each measured point (shared with the monitor).
        lag_in_measurements: a lag reference counts measurements back (step mode), not epochs.
        collective: sums across processes for a sharded probe.
        device: where the pairs are evaluated (the model's device).
        dtype: precision of the decompositions.
    """

    def __init__(
        self,
        store: SnapshotStore,
        references: Sequence[Reference],
        metrics: Sequence[str],
        *,
        baseline: bool,
        measured: list[int],
        points: dict[int, tuple[int, int]],
        collective: Collective,
        device: torch.device,
        dtype: torch.dtype,
        lag_in_measurements: bool = False,
    ) -> None:
        self.store = store
        self.references = list(references)
        self.metrics = tuple(metrics)
        self.baseline = baseline
        self.measured = measured
        self.points = points
        self.lag_in_measurements = lag_in_measurements
        self._collective = collective
        self._device = device
        self._dtype = dtype
        self._shuffles: dict[int, Tensor] = {}

    @property
    def wants_final(self) -> bool:
        """Whether a ``final`` reference keeps every epoch's snapshot until the end of fit."""
        return any(reference.kind == "final" for reference in self.references)

    def rows_for(self, point: int, snapshots: Mapping[str, Snapshot]) -> list[dict[str, Any]]:
        """Rows of one measurement: kept directions, each layer against each reference, and the baselines."""
        epoch, step = self.points[point]
        jobs: list[tuple[dict[str, Any], str, Pair]] = []
        rows = []
        for layer, snapshot in snapshots.items():
            rows.append(row(epoch, step, layer, "dims", "svcca", float(snapshot.kept)))
            for reference in self.references:
                other = self.reference_snapshot(reference, layer, point)
                if other is None or other.n_datapoints != snapshot.n_datapoints:
                    continue
                for metric in self.metrics:
                    jobs.append(
                        (
                            row(epoch, step, layer, reference.name, metric, math.nan),
                            metric,
                            pair_for(metric, snapshot, other),
                        )
                    )
            if self.baseline:
                shuffle = self._shuffle(snapshot.n_datapoints)
                for metric in self.metrics:
                    pair = pair_for(metric, snapshot, snapshot, shuffle)
                    jobs.append((row(epoch, step, layer, "baseline", metric, math.nan), metric, pair))
        return rows + self._evaluate(jobs)

    def against_point(
        self, target: int, name: str, layers: Sequence[str], points: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Each measured point's snapshot (or those of ``points``) against point ``target``'s, as ``name`` rows."""
        rows = []
        for layer in layers:
            latest = stored_snapshot(self.store, (layer, str(target)))
            if latest is None:
                continue
            jobs = []
            for point in self.measured if points is None else points:
                snapshot = None if point > target else stored_snapshot(self.store, (layer, str(point)))
                if snapshot is None:
                    continue
                epoch, step = self.points[point]
                for metric in self.metrics:
                    jobs.append(
                        (
                            row(epoch, step, layer, name, metric, math.nan),
                            metric,
                            pair_for(metric, snapshot, latest),
                        )
                    )
            rows += self._evaluate(jobs)
        return rows

    def reference_snapshot(self, reference: Reference, layer: str, point: int) -> Snapshot | None:
        """The snapshot a layer is compared with at ``point``, or ``None`` when there is none (yet)."""
        earlier = [p for p in self.measured if p < point]
        if reference.kind == "final":
            return None  # compared at the end of fit (and live, for the heatmap)
        if reference.fixed:
            key = (layer, reference.name)
        elif not earlier:
            return None  # the first measurement has no earlier point
        elif reference.kind == "initial":
            key = (layer, str(self.measured[0]))
        elif reference.kind == "previous":
            key = (layer, str(earlier[-1]))
        elif self.lag_in_measurements:
            if len(earlier) < reference.lag:
                return None
            key = (layer, str(earlier[-reference.lag]))
        else:  # lag in epochs
            key = (layer, str(point - reference.lag))
        return stored_snapshot(self.store, key)

    def prune(self, point: int) -> None:
        """Forget snapshots of measured points no reference will need again."""
        if self.wants_final:
            return  # the final pass needs every point
        horizon = max((reference.lag for reference in self.references if reference.kind == "lag"), default=0)
        if self.lag_in_measurements:
            kept = set(self.measured[-(horizon + 1) :])
        else:
            kept = {p for p in self.measured if p == point or p > point - horizon}
        if self.measured and any(reference.kind == "initial" for reference in self.references):
            kept.add(self.measured[0])
        for layer, tag in self.store.keys():
            if tag.isdigit() and int(tag) not in kept:
                self.store.discard((layer, tag))

    def _evaluate(self, jobs: Sequence[tuple[dict[str, Any], str, Pair]]) -> list[dict[str, Any]]:
        """Fill in each job's row value; rows whose value is not finite are dropped."""
        values = evaluate(
            [(metric, pair) for _, metric, pair in jobs], self._collective, device=self._device, dtype=self._dtype
        )
        return [{**r, "value": v} for (r, _, _), v in zip(jobs, values, strict=True) if math.isfinite(v)]

    def _shuffle(self, n: int) -> Tensor:
        """The fixed datapoint permutation of the noise baseline (seeded: the same on every process and run)."""
        if n not in self._shuffles:
            self._shuffles[n] = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        return self._shuffles[n]
