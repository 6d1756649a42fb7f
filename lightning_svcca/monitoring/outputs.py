"""What one monitored run writes: scalars, heatmaps, freeze events, the history CSV and the cross-layer maps.

The report step of a measurement, and the run's files. :class:`RunOutputs` names the run (its snapshot folder
``svcca_snapshots/<run_id>/`` under ``log_dir``), sends each measurement's rows to the writers (through
:class:`~lightning_svcca.output.writers.Reporter`), draws a heatmap per reference, keeps the history CSV up to
date under a file name claimed for this run, and at the end of fit writes the ``final`` comparisons and the
cross-layer maps. Only rank zero writes; on the other processes every method does nothing but what the state
needs (the cross-layer rows).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_svcca.core.safe_files import FileTrustWarning, linked_folder, try_write
from lightning_svcca.monitoring.leftovers import clean_leftovers
from lightning_svcca.monitoring.runtime import Runtime
from lightning_svcca.output.reporting import (
    FREEZE_METRIC,
    FREEZE_REFERENCE,
    HISTORY_FILE,
    layer_map_image,
    write_history_csv,
)
from lightning_svcca.output.writers import Reporter
from lightning_svcca.pipeline.comparisons import HeatmapSource
from lightning_svcca.pipeline.moments import CrossLayerMoments
from lightning_svcca.pipeline.store import SnapshotStore

__all__ = ["CROSS_LAYER_COLUMNS", "SNAPSHOT_FOLDER", "RunOutputs"]

#: The folder under ``log_dir`` holding each run's snapshot files (``svcca_snapshots/<run_id>/``).
SNAPSHOT_FOLDER = "svcca_snapshots"

#: Columns of the cross-layer CSV (``svcca_cross_layer.csv`` beside the history).
CROSS_LAYER_COLUMNS = ("epoch", "step", "fraction", "metric", "reference", "layer", "reference_layer", "value")


class RunOutputs:
    """The writers, heatmaps and files of one run (written on rank zero only).

    Args:
        writers: normalised writers (:func:`~lightning_svcca.output.writers.as_writers`).
        log_dir: where the history CSV and the run's snapshot folder go; ``None``: no file.
        runtime: which process is rank zero.
        metrics: the metrics measured (a heatmap each).
    """

    def __init__(self, writers: Sequence[Any], log_dir: Path | None, runtime: Runtime, metrics: Sequence[str]) -> None:
        self.writers = list(writers)
        self.log_dir = log_dir
        self.runtime = runtime
        self.metrics = tuple(metrics)
        #: This run's id: its snapshot folder under ``log_dir`` (kept across resumes).
        self.run_id: str | None = None
        #: The history CSV's file name in ``log_dir`` (unique among runs sharing the folder; kept across resumes).
        self.csv_name: str | None = None
        self.reporter: Reporter | None = None

    def open(self, store: SnapshotStore, *, axis: str, heatmap_time_share: float) -> None:
        """At the run's start: ``store`` kept in the run's folder, the history CSV claimed, the reporter made."""
        resumed = self.run_id is not None
        self.run_id = self.run_id or self.runtime.broadcast(uuid.uuid4().hex[:12])
        if self.log_dir is not None and self.runtime.is_global_zero:  # the others keep snapshots in memory
            folder = self.log_dir / SNAPSHOT_FOLDER / self.run_id
            link = linked_folder(self.log_dir, folder)
            if link is None and resumed:
                self._clean(folder)
            if link is None:
                store.persist_to(folder)
            else:
                _refuse_link(link)
        zero = self.runtime.is_global_zero
        self.reporter = Reporter(
            self.writers if zero else [],
            self.claim_csv(),
            axis=axis,
            heatmap_time_share=heatmap_time_share,
            background=True,
        )

    def _clean(self, folder: Path) -> None:
        """A resumed run: remove what a killed process of it left (:mod:`~.leftovers`), saying so with the bytes."""
        assert self.log_dir is not None
        removed, size = clean_leftovers(folder, self.log_dir, self.csv_name)
        if removed:
            self.runtime.logger.info(
                "SVCCA removed what a killed process of this run left: %d spill folder(s) and partial file(s), %.1f MiB"
                " (%s)",
                len(removed),
                size / 2**20,
                ", ".join(str(path) for path in removed[:4]) + (", ..." if len(removed) > 4 else ""),
            )

    def layout(self, references: Sequence[str], layers: Sequence[str], *, frozen: bool) -> None:
        """The TensorBoard chart layout: each metric against each of ``references``, dims, frozen (if ``frozen``)."""
        if self.runtime.is_global_zero and self.reporter is not None:
            charts = [(metric, name) for metric in self.metrics for name in references]
            charts += [("svcca", "dims")] + ([(FREEZE_METRIC, FREEZE_REFERENCE)] if frozen else [])
            self.reporter.layout(charts, layers)

    def measurement(
        self,
        rows: Sequence[Mapping[str, Any]],
        step: int,
        heatmaps: Mapping[str, HeatmapSource],
        history: Sequence[Mapping[str, Any]],
        layers: Sequence[str],
    ) -> None:
        """One measurement's rows as scalars, a heatmap per reference (drawn from its rows), the CSV rewritten."""
        if not self.runtime.is_global_zero or self.reporter is None:
            return
        self.reporter.scalars(rows)
        for reference, source in heatmaps.items():
            for metric in self.metrics:
                self.reporter.heatmap(source, reference=reference, metric=metric, layers=layers, step=step)
        self.reporter.write_csv(history)

    def freeze_event(self, message: str, step: int) -> None:
        """A freeze, as text."""
        if self.reporter is not None:
            self.reporter.text("svcca/freeze", message, step)

    def final(
        self,
        history: Sequence[Mapping[str, Any]],
        final: Sequence[Mapping[str, Any]],
        step: int,
        layers: Sequence[str],
    ) -> None:
        """The end of fit's ``final`` rows: the CSV, their scalars, each metric's heatmap and summary."""
        if not self.runtime.is_global_zero or self.reporter is None:
            return
        self.reporter.write_csv(history)
        self.reporter.late_scalars(final)
        for metric in self.metrics:
            image = self.reporter.heatmap(
                history, reference="final", metric=metric, layers=layers, step=step, always=True
            )
            ours = [r for r in final if r["metric"] == metric]
            self.reporter.final_summary(image, ours, step, f"{metric}/final/heatmap")

    def cross_layer(self, moments: CrossLayerMoments) -> list[dict[str, Any]]:
        """Each kept moment against the cross-layer reference: its rows; on rank zero, images and a CSV."""
        zero = self.runtime.is_global_zero
        rows: list[dict[str, Any]] = []
        for moment, layer_map in moments.maps(self.metrics):
            for i, layer in enumerate(layer_map.rows):
                for j, other in enumerate(layer_map.columns):
                    rows.append(
                        {
                            "epoch": moment.epoch,
                            "step": moment.step,
                            "fraction": moment.fraction,
                            "metric": layer_map.metric,
                            "reference": moments.reference,
                            "layer": layer,
                            "reference_layer": other,
                            "value": float(layer_map.values[i, j]),
                        }
                    )
            if zero and self.reporter is not None:
                title = f"{layer_map.metric}: epoch {moment.epoch} ({moment.fraction:.0%}) vs {moments.reference}"
                image = layer_map_image(layer_map.rows, layer_map.columns, layer_map.values.numpy(), title=title)
                self.reporter.image(f"{layer_map.metric}/cross_layer/{moments.reference}", image, moment.step)
        if zero and self.log_dir is not None and self.csv_name is not None:
            name = self.csv_name.replace("history", "cross_layer")
            path = self.log_dir / name
            try_write(write_history_csv, rows, path, where=path, warned=set(), columns=CROSS_LAYER_COLUMNS)
        return rows

    def flush(self) -> None:
        """Draw the heatmaps still waiting and flush the writers."""
        if self.reporter is not None:
            self.reporter.flush()

    def claim_csv(self) -> Path | None:
        """This run's history CSV: ``svcca_history.csv``, or the first free ``svcca_history-N.csv`` beside it."""
        if self.log_dir is None or not self.runtime.is_global_zero:
            return None
        if self.csv_name is not None:
            return self.log_dir / self.csv_name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stem, suffix = HISTORY_FILE.rsplit(".", 1)
        for index in range(10_000):
            name = HISTORY_FILE if index == 0 else f"{stem}-{index}.{suffix}"
            try:
                (self.log_dir / name).open("x").close()  # claimed atomically: concurrent runs get different names
            except FileExistsError:
                continue
            self.csv_name = name
            if index:
                self.runtime.logger.info(
                    "SVCCA writes this run's history to %s: %s in %s holds another run's (or that of a run killed"
                    " before its first checkpoint, which nothing can resume: delete it if so)",
                    name,
                    HISTORY_FILE,
                    self.log_dir,
                )
            return self.log_dir / name
        raise RuntimeError(f"no free history file name in {self.log_dir}")


def _refuse_link(link: Path) -> None:
    """Warn that no snapshot is written through ``link`` (a symbolic link inside the log folder)."""
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    warnings.warn(
        f"{link} is a symbolic link (to {target}): the monitor writes nothing through links inside its log folder, so"
        " snapshots stay in memory and go into the checkpoint as tensors, and training goes on. Remove the link (or"
        " log to another folder) to have snapshot files again",
        FileTrustWarning,
        stacklevel=3,
    )
