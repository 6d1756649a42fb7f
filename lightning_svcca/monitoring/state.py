"""The monitor's checkpoint state: one flat, versioned dict of plain values, whose keys never change.

Checkpoints written by earlier versions must still load, so every key keeps its name and meaning, and a key
missing from an older checkpoint takes its default. The entries come from the monitor's parts: ``frozen``,
``streaks`` and ``freezer`` from the freezing coordinator, ``measured``, ``points`` and ``initial_lost`` from the
timeline, ``layer_order`` from the snapshotter, ``snapshots`` from the snapshot store, ``run_id`` and ``csv_name``
from the run's outputs, ``cross_layer`` from the cross-layer moments, and the rest from the monitor itself.

A checkpoint resumed with other settings keeps its history (:func:`load_state`): layers are matched by name
(:meth:`~lightning_svcca.monitoring.snapshotting.Snapshotter.resume_layers`), and snapshots that the new metrics
cannot use (``metrics``: what they were taken for) are dropped with a warning, as for a changed probe.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_svcca.monitoring.state_checks import validate_state
from lightning_svcca.output.history import pack_history, unpack_history
from lightning_svcca.pipeline.metrics import snapshot_needs
from lightning_svcca.pipeline.sample_metrics import AFFINE_METRICS
from lightning_svcca.pipeline.wrappers import shown_name

if TYPE_CHECKING:
    from lightning_svcca.monitoring.monitor import SVCCAMonitor

__all__ = ["STATE_VERSION", "load_state", "restart_comparisons", "state_of"]

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
        "task": freezing["task"],
        "measured": timeline["measured"],
        "initial_lost": timeline["initial_lost"],
        "metrics": list(monitor.config.metrics),
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
    state = validate_state(_shown_names(state), model=monitor.model, layers=[spec.name for spec in monitor.specs])
    monitor.history = unpack_history(state.get("history", []))
    monitor.freezing.load_state_dict(state)
    monitor.timeline.load_state_dict(state)
    monitor.snapshots.resume_layers(list(state.get("layer_order", [])))
    monitor.last_measured_step = int(state.get("last_measured_step", -1))
    monitor.probe_fingerprint = state.get("probe_fingerprint")
    missing = monitor.store.load_state_dict(state.get("snapshots", {}))
    monitor.skipped = [tuple(entry) for entry in state.get("skipped", [])]
    monitor.outputs.run_id = state.get("run_id")
    monitor.outputs.csv_name = state.get("csv_name")
    if monitor.cross_layer is not None:
        monitor.cross_layer.load_state_dict(state.get("cross_layer", {}))
    _check_metrics(monitor, state.get("metrics"))
    if missing:
        monitor.warn_once(
            "snapshots-missing",
            f"the checkpoint's snapshot files of {len(missing)} layer/epoch pairs are gone (e.g. {missing[:3]});"
            " the run goes on with what it has: comparisons with those epochs are skipped, and a freeze policy"
            " may need more epochs to decide. Keep the run's svcca_snapshots folder with its checkpoints",
        )


#: Entries that hold file names or paths, never module names.
_FILE_KEYS = frozenset({"name", "file", "folder"})


def _shown_names(value: Any, key: Any = None) -> Any:
    """``value`` with module names as the monitor now shows them (:func:`shown_name`: no ``_orig_mod`` segment).

    Why: checkpoints written before names dropped ``torch.compile``'s segment name a compiled submodule's layers
    ``net._orig_mod.fc``; renamed, their history, freezes and snapshots continue under ``net.fc``. Tensors, file
    names and paths are left as they are.
    """
    if isinstance(value, Mapping):
        return {_shown_names(k): _shown_names(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shown_names(item, key) for item in value)
    if isinstance(value, str) and key not in _FILE_KEYS and "/" not in value and "\\" not in value:
        return shown_name(value)
    return value


def _check_metrics(monitor: SVCCAMonitor, saved: Any) -> None:
    """Drop the restored snapshots when the metrics now need parts they were taken without.

    Parts: all directions, or the right singular vectors; comparing without them would measure truncated snapshots.
    """
    if not saved or not monitor.store.keys():
        return
    old_full, old_right, _ = snapshot_needs(list(saved))
    full, right, _ = snapshot_needs(monitor.config.metrics)
    if (full and not old_full) or (right and not old_right):
        restart_comparisons(
            monitor,
            f"metrics={list(monitor.config.metrics)} need snapshots with more directions than the checkpoint's"
            f" (taken for metrics={list(saved)})",
        )
    elif set(monitor.config.metrics) & set(AFFINE_METRICS) and _without_affine(monitor.store):
        restart_comparisons(
            monitor,
            f"metrics={list(monitor.config.metrics)} need snapshots that keep the layer's mean (Snapshot.affine), and"
            f" the checkpoint's snapshots were taken without it (for metrics={list(saved)})",
        )


def _without_affine(store: Any) -> bool:
    """Whether the first readable snapshot in ``store`` lacks :attr:`Snapshot.affine` (all of a run's do or none)."""
    for key in store.keys():
        try:
            return store.get(key).affine is None
        except KeyError:
            continue
    return False


def restart_comparisons(monitor: SVCCAMonitor, why: str) -> None:
    """Drop every snapshot (they cannot be compared with new ones) and say which references lose what.

    The history and freezes stay; ``initial`` has nothing to compare with for the rest of the run, the point
    references (``previous``, lags) start again from the next measurement, fixed ones are snapshotted again.
    """
    lost = [ref.name for ref in monitor.config.references if ref.kind.from_point]
    fixed = [reference.name for reference in monitor.config.references if reference.fixed]
    monitor.warn_once(
        "comparisons-restarted",
        f"{why}: earlier snapshots are dropped and cannot be compared with new ones. The history"
        f" ({len(monitor.history)} rows) and freezes are kept; references now incomparable with earlier epochs:"
        f" {lost or 'none'} ('initial' gets no new rows; the others start again from the measurement after the"
        f" next){'; fixed references ' + str(fixed) + ' are snapshotted again' if fixed else ''}."
        " To keep comparing with earlier epochs, resume with the checkpoint's probe and metrics",
    )
    for key in monitor.store.keys():
        monitor.store.discard(key)
    monitor.timeline.restart()
