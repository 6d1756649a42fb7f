"""The monitor's checkpoint state: one flat, versioned dict of plain values, whose keys never change.

Checkpoints written by earlier versions must still load, so every key keeps its name and meaning, and a key
missing from an older checkpoint takes its default. The entries come from the monitor's parts: ``frozen``,
``streaks`` and ``freezer`` from the freezing coordinator, ``measured`` and ``points`` from the timeline,
``layer_order`` from the snapshotter, ``snapshots`` from the snapshot store, ``run_id`` and ``csv_name`` from the
run's outputs,
``cross_layer`` from the cross-layer moments, and the rest from the monitor itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_svcca.output.history import pack_history, unpack_history

if TYPE_CHECKING:
    from lightning_svcca.monitoring.monitor import SVCCAMonitor

__all__ = ["STATE_VERSION", "load_state", "state_of"]

STATE_VERSION = 1


def state_of(monitor: SVCCAMonitor) -> dict[str, Any]:
    """Everything needed to continue identically: history, freezes, policy counters, snapshots."""
    freezing = monitor.freezing.state_dict()
    timeline = monitor.timeline.state_dict()
    return {
        "version": STATE_VERSION,
        "history": pack_history(monitor.history),
        "frozen": freezing["frozen"],
        "streaks": freezing["streaks"],
        "freezer": freezing["freezer"],
        "measured": timeline["measured"],
        "layer_order": list(monitor.snapshots.layer_order),
        "last_measured_step": monitor.last_measured_step,
        "probe_fingerprint": monitor.probe_fingerprint,
        "snapshots": monitor.store.state_dict(),
        "skipped": [list(entry) for entry in monitor.skipped],
        "points": timeline["points"],
        "run_id": monitor.outputs.run_id,
        "csv_name": monitor.outputs.csv_name,
        "cross_layer": {} if monitor.cross_layer is None else monitor.cross_layer.state_dict(),
    }


def load_state(monitor: SVCCAMonitor, state: Mapping[str, Any]) -> None:
    """Restore :func:`state_of` into ``monitor``; warn when the checkpoint's snapshot files are gone."""
    monitor.history = unpack_history(state.get("history", []))
    monitor.freezing.load_state_dict(state)
    monitor.timeline.load_state_dict(state)
    monitor.snapshots.layer_order = list(state.get("layer_order", []))
    monitor.last_measured_step = int(state.get("last_measured_step", -1))
    monitor.probe_fingerprint = state.get("probe_fingerprint")
    missing = monitor.store.load_state_dict(state.get("snapshots", {}))
    monitor.skipped = [tuple(entry) for entry in state.get("skipped", [])]
    monitor.outputs.run_id = state.get("run_id")
    monitor.outputs.csv_name = state.get("csv_name")
    if monitor.cross_layer is not None:
        monitor.cross_layer.load_state_dict(state.get("cross_layer", {}))
    if missing:
        monitor.warn_once(
            "snapshots-missing",
            f"the checkpoint's snapshot files of {len(missing)} layer/epoch pairs are gone (e.g. {missing[:3]});"
            " the run goes on with what it has: comparisons with those epochs are skipped, and a freeze policy"
            " may need more epochs to decide. Keep the run's svcca_snapshots folder with its checkpoints",
        )
