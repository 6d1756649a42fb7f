"""Comparisons: each new snapshot against its references, the ``final`` pass, and forgetting unneeded snapshots.

The comparison stage of a measurement. A measurement at a point (see :mod:`~lightning_svcca.core.timeline`)
compares every layer's new snapshot with each reference that has one by then (:meth:`Comparisons.rows_for`): the
last measured point (``previous``), the first (``initial``), a fixed model or features, or a freeze policy's lag.
The ``final`` reference is different: every measured point is compared with the latest one
(:meth:`Comparisons.against_point`), live for the heatmap and once at the end of fit for the history. Afterwards
:meth:`Comparisons.prune` drops the snapshots no reference will need again. Each row is a plain dict (see
:func:`~lightning_svcca.core.rows.row`); rows whose value is not finite are dropped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_svcca.core.rows import row
from lightning_svcca.core.safe_files import stored_snapshot
from lightning_svcca.core.timeline import Timeline, evenly_spaced
from lightning_svcca.pipeline.calibration import calibrated_rows
from lightning_svcca.pipeline.metrics import Pair, evaluate, metric_info, pair_for
from lightning_svcca.pipeline.references import Reference, ReferenceKind
from lightning_svcca.pipeline.snapshot import Collective, LocalCollective, Snapshot
from lightning_svcca.pipeline.store import SnapshotStore

__all__ = ["LIVE_FINAL_COLUMNS", "Comparisons", "HeatmapSource"]

#: The rows a heatmap is drawn from, or a function computing them when the picture is drawn.
HeatmapSource = Sequence[dict[str, Any]] | Callable[[], Sequence[dict[str, Any]]]

#: Points the live "final" heatmap compares with the latest one at most (the end-of-fit pass compares all).
LIVE_FINAL_COLUMNS = 10


class Comparisons:
    """Compares snapshots held in a :class:`SnapshotStore` with the run's references.

    Args:
        store: epoch snapshots under ``(layer, str(epoch))``, fixed references under ``(layer, name)``.
        references: the references, in the order of the rows.
        metrics: the metrics computed for each pair.
        baseline: also compare each snapshot with itself under a fixed datapoint shuffle (the noise floor).
        timeline: the run's measured points (the monitor's own object: it adds each point once compared).
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
        timeline: Timeline,
        collective: Collective,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.store = store
        self.references = list(references)
        self.metrics = tuple(metrics)
        self.baseline = baseline
        self.timeline = timeline
        self._collective = collective
        self._device = device
        self._dtype = dtype
        self._shuffles: dict[int, Tensor] = {}

    @property
    def wants_final(self) -> bool:
        """Whether a ``final`` reference keeps every epoch's snapshot until the end of fit."""
        return any(reference.kind is ReferenceKind.FINAL for reference in self.references)

    def rows_for(self, point: int, epoch: int, step: int, snapshots: Mapping[str, Snapshot]) -> list[dict[str, Any]]:
        """Rows of the measurement at ``point`` (``epoch``, ``step``), before it joins the timeline.

        Kept directions, each layer against each reference, the baselines, and each compared value calibrated
        against its baseline (:func:`~lightning_svcca.pipeline.calibration.calibrated_rows`).
        """
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
        measured = self._evaluate(jobs)
        return rows + measured + calibrated_rows(measured)

    def against_point(
        self,
        target: int,
        name: str,
        layers: Sequence[str],
        points: Sequence[int] | None = None,
        *,
        alone: bool = False,
        metrics: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Each measured point's snapshot (or those of ``points``) against point ``target``'s, as ``name`` rows.

        ``alone``: computed by this process only, from the whole bases every process holds, with no collective (the
        live ``final`` heatmap, drawn on rank zero alone: a collective there waits for the other processes forever).
        ``metrics``: these of the monitor's metrics only (``None``: all).
        """
        rows = []
        for layer in layers:
            latest = stored_snapshot(self.store, (layer, str(target)))
            if latest is None:
                continue
            jobs = []
            for point in self.timeline.measured if points is None else points:
                snapshot = None if point > target else stored_snapshot(self.store, (layer, str(point)))
                if snapshot is None:
                    continue
                epoch, step = self.timeline.at(point)
                for metric in self.metrics if metrics is None else metrics:
                    jobs.append(
                        (
                            row(epoch, step, layer, name, metric, math.nan),
                            metric,
                            pair_for(metric, snapshot, latest),
                        )
                    )
            rows += self._evaluate(jobs, alone=alone)
        return rows

    def heatmap_sources(
        self, point: int, history: Sequence[dict[str, Any]], layers: Sequence[str], *, live_final: bool
    ) -> dict[str, HeatmapSource]:
        """The rows each reference's heatmap is drawn from after the measurement at ``point``.

        A reference compared at each measurement draws from the ``history`` (a freeze policy's lag reference is only
        charted). With ``live_final``, ``final`` gets the learning-dynamics picture so far: at most
        :data:`LIVE_FINAL_COLUMNS` points against the latest (not kept in the history), so a measurement costs the
        same at epoch 10 and at epoch 1000. Those comparisons are a function, computed (once) only when the
        picture is drawn: a run without image writers, or one whose heatmaps wait for their time share, never
        pays for them. Only the metrics that follow from two bases' cross product are drawn live: the ones computed
        from the datapoints (rbf_cka, the held-out and the sample-level measures: seconds each on thousands of
        datapoints, on rank zero alone while the other processes wait) get their ``final`` picture at the end.
        """
        sources: dict[str, HeatmapSource] = {
            reference.name: history for reference in self.references if reference.kind.charted
        }
        if self.wants_final and len(self.timeline) > 1 and live_final:
            shown = evenly_spaced(self.timeline.measured, LIVE_FINAL_COLUMNS)
            cheap = [metric for metric in self.metrics if not metric_info(metric).from_rows]
            sources["final"] = functools.cache(
                lambda: self.against_point(point, "final", layers, shown, alone=True, metrics=cheap)
            )
        return sources

    def reference_snapshot(self, reference: Reference, layer: str, point: int) -> Snapshot | None:
        """The snapshot a layer is compared with at ``point``, or ``None`` when there is none (yet)."""
        if reference.kind is ReferenceKind.FINAL:
            return None  # compared at the end of fit (and live, for the heatmap)
        if reference.fixed:
            return stored_snapshot(self.store, (layer, reference.name))
        if reference.kind is ReferenceKind.INITIAL:
            other = self.timeline.first if self.timeline.before(point) else None
        elif reference.kind is ReferenceKind.PREVIOUS:
            other = self.timeline.previous(point)
        elif reference.fraction:
            other = self.timeline.lagged_by_fraction(point, reference.fraction)
        else:
            other = self.timeline.lagged(point, reference.lag)
        return None if other is None else stored_snapshot(self.store, (layer, str(other)))

    def prune(self, point: int) -> None:
        """Forget snapshots of measured points no reference will need again."""
        if self.wants_final:
            return  # the final pass needs every point
        horizon = max(
            (reference.lag for reference in self.references if reference.kind is ReferenceKind.LAG), default=0
        )
        kept = self.timeline.recent(point, horizon)
        for reference in self.references:
            if reference.kind is ReferenceKind.LAG and reference.fraction:
                kept |= self.timeline.reachable_by_fraction(point, reference.fraction)
        first = self.timeline.first
        if first is not None and any(reference.kind is ReferenceKind.INITIAL for reference in self.references):
            kept.add(first)
        for layer, tag in self.store.keys():
            if tag.isdigit() and int(tag) not in kept:
                self.store.discard((layer, tag))

    def _evaluate(
        self, jobs: Sequence[tuple[dict[str, Any], str, Pair]], *, alone: bool = False
    ) -> list[dict[str, Any]]:
        """Fill in each job's row value; rows whose value is not finite are dropped (``alone``: no collective)."""
        collective = LocalCollective() if alone else self._collective
        values = evaluate(
            [(metric, pair) for _, metric, pair in jobs], collective, device=self._device, dtype=self._dtype
        )
        return [{**r, "value": v} for (r, _, _), v in zip(jobs, values, strict=True) if math.isfinite(v)]

    def _shuffle(self, n: int) -> Tensor:
        """The fixed datapoint permutation of the noise baseline (seeded: the same on every process and run)."""
        if n not in self._shuffles:
            self._shuffles[n] = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        return self._shuffles[n]
