"""Checks on a monitor state read from a checkpoint, before any of it is used.

A checkpoint is a file anyone may have edited. Its state names files and folders (the run id is the snapshot
folder, ``csv_name`` the history file) and layers, and holds numbers the run continues from. :func:`validate_state`
accepts it only when every name is a plain name that stays inside the log folder (no absolute path, separator or
``..``), the history file is one this package would name, every layer is monitored and every parameter or module
belongs to the model, and every number is an integer in range; otherwise it raises ``ValueError`` saying which
field is wrong. Files named by the state are read with ``weights_only=True`` only (see
:mod:`~lightning_svcca.core.safe_files`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_svcca.core.safe_files import snapshot_problem
from lightning_svcca.output.reporting import HISTORY_FILE
from lightning_svcca.pipeline.wrappers import modules_by_name, parameters_by_name

__all__ = ["plain_name", "validate_state"]

#: Integers a state holds (epochs, steps, positions) lie in [-1, _MAX_INT).
_MAX_INT = 1 << 62
#: The history file names a run may claim: ``svcca_history.csv`` or ``svcca_history-<n>.csv``.
_CSV_NAME = re.compile(re.escape(HISTORY_FILE.rsplit(".", 1)[0]) + r"(-[0-9]{1,6})?\.csv")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain_name(value: Any, what: str) -> str:
    """``value`` when it is a plain file or folder name: it stays inside the folder it is joined to.

    Raises:
        ValueError: not a string, empty, ``.`` or ``..``, or holding a path separator or a control character (an
            absolute path holds a separator).
    """
    if not isinstance(value, str) or value in ("", ".", "..") or len(value) > 255:
        raise ValueError(f"{what} must be a plain file or folder name, got {value!r}")
    if "/" in value or "\\" in value or _CONTROL.search(value) or ":" in value:
        raise ValueError(f"{what} must be a plain name without separators or control characters, got {value!r}")
    return value


def validate_state(state: Any, *, model: nn.Module, layers: Collection[str]) -> dict[str, Any]:
    """``state`` (a monitor's ``state_dict`` from a checkpoint) after checking everything in it; see the module.

    Args:
        state: the state read from the checkpoint.
        model: the model the run continues with.
        layers: the monitored layer names (with the model's other modules, the names the state may hold).

    Raises:
        ValueError: a field that could write outside the log folder, name something the model does not have,
            or hold a number out of range; the message names the field.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's SVCCA state is a {type(state).__name__}, not a dict")
    try:
        # layers of the model that this run does not monitor are fine: a resume with other layers keeps their rows
        _check_fields(state, model, set(layers) | set(modules_by_name(model)))
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"the checkpoint's SVCCA state is malformed: {type(error).__name__} {error}") from error
    return dict(state)


def _check_fields(state: Mapping[str, Any], model: nn.Module, known: set[str]) -> None:
    """Every field :func:`validate_state` checks."""
    _optional_name(state.get("run_id"), "run_id")
    csv_name = state.get("csv_name")
    if csv_name is not None and not (isinstance(csv_name, str) and _CSV_NAME.fullmatch(csv_name)):
        raise ValueError(f"csv_name must be {HISTORY_FILE} or svcca_history-<n>.csv, got {csv_name!r}")
    for key in ("last_measured_step", "version", "epoch_offset"):
        if key in state:
            _integer(state[key], key)
    for point in state.get("measured", []):
        _integer(point, "measured")
    for point, at in dict(state.get("points") or {}).items():
        _integer(int(point) if isinstance(point, str) and point.lstrip("-").isdigit() else point, "points")
        if not isinstance(at, (list, tuple)) or len(at) != 2:
            raise ValueError(f"points[{point!r}] must be (epoch, step), got {at!r}")
        _integer(at[0], "points"), _integer(at[1], "points")
    _layer_names(state.get("layer_order", []), known, "layer_order")
    for key in ("frozen", "streaks"):
        _layer_names(dict(state.get(key, {})), known, key)
        for value in dict(state.get(key, {})).values():
            _integer(value, key)
    _check_freezer(state.get("freezer", {}), model, known)
    _check_history(state.get("history", []), known)
    _check_snapshots(state.get("snapshots", {}), known)
    _check_cross_layer(state.get("cross_layer", {}), known)
    for entry in state.get("skipped", []):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"skipped entries must be (epoch, layer, reason), got {entry!r}")
        _integer(entry[0], "skipped")
    fingerprint = state.get("probe_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise ValueError(f"probe_fingerprint must be a string, got {type(fingerprint).__name__}")


def _optional_name(value: Any, what: str) -> None:
    if value is not None:
        plain_name(value, what)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < _MAX_INT:
        raise ValueError(f"{what} must hold integers in [-1, 2**62), got {value!r}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or _CONTROL.search(value) or len(value) > 1000:
        raise ValueError(f"{what} must be text without control characters, got {value!r:.80}")
    return value


def _layer_names(names: Any, known: set[str], what: str) -> None:
    """Every name in ``names`` (a list or a dict's keys) is a layer of the model."""
    names = list(names)
    for name in names:
        _text(name, what)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"the checkpoint's {what} names layers the model does not have: {unknown[:8]}; is it the same model?"
        )


def _check_freezer(state: Any, model: nn.Module, known: set[str]) -> None:
    """Frozen blocks name monitored layers and parameters and modules of the model."""
    if not isinstance(state, Mapping):
        raise ValueError(f"freezer must be a dict, got {type(state).__name__}")
    parameters, modules = set(parameters_by_name(model)), set(modules_by_name(model))
    for key, names in (("parameters", parameters), ("norm_modules", modules), ("modules", modules)):
        entries = dict(state.get(key, {}))
        _layer_names(entries, known, f"freezer {key}")
        missing = sorted({str(n) for listed in entries.values() for n in listed} - names)
        if missing:
            raise ValueError(f"the checkpoint's frozen {key} are not in the model: {missing[:8]}")
    positions = dict(state.get("positions", {}))
    _layer_names(positions, known, "freezer positions")
    for position in positions.values():
        _integer(position, "freezer positions")


def _check_history(history: Any, known: set[str]) -> None:
    """A packed history's codes point into its name tables; its layers are monitored."""
    if not isinstance(history, Mapping):  # rows as dicts (older checkpoints)
        for row in history:
            _integer(row["epoch"], "history epoch"), _text(row["reference"], "history reference")
            _text(row["metric"], "history metric"), _layer_names([row["layer"]], known, "history")
            float(row["value"])
        return
    lengths = set()
    for column in ("epoch", "step", "value", "layer", "reference", "metric"):
        values = history[column]
        if not isinstance(values, Tensor) or values.ndim != 1:
            raise ValueError(f"history {column} must be a 1-D tensor")
        lengths.add(values.numel())
    if len(lengths) != 1:
        raise ValueError(f"history columns differ in length: {sorted(lengths)}")
    for column in ("layer", "reference", "metric"):
        names = list(history[f"{column}_names"])
        for name in names:
            _text(name, f"history {column}")
        codes = history[column]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
            raise ValueError(f"history {column} codes fall outside its name table")
    _layer_names(history["layer_names"], known, "history")
    for column in ("epoch", "step"):
        if history[column].numel() and not -1 <= int(history[column].min()) <= int(history[column].max()) < _MAX_INT:
            raise ValueError(f"history {column} out of range")


def _check_snapshots(state: Any, known: set[str]) -> None:
    """Snapshot entries: plain ``.pt`` file names (read only, with ``weights_only=True``), monitored layers."""
    if not isinstance(state, Mapping):
        raise ValueError(f"snapshots must be a dict, got {type(state).__name__}")
    for joined, entry in state.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"snapshots[{joined!r}] must be a dict")
        if joined == "":
            if not isinstance(entry.get("folder"), str):
                raise ValueError("snapshots folder must be a string")
            continue
        layer, _, tag = str(joined).rpartition("@")
        _layer_names([layer], known, "snapshots")
        _text(tag, "snapshot tag")
        if "name" not in entry and "file" not in entry and snapshot_problem(dict(entry)) is not None:
            raise ValueError(f"snapshots[{joined!r}] is not a sound snapshot: {snapshot_problem(dict(entry))}")
        if "name" in entry and not plain_name(entry["name"], "snapshot file name").endswith(".pt"):
            raise ValueError(f"snapshot file names end in .pt, got {entry['name']!r}")
        if "file" in entry and not (isinstance(entry["file"], str) and entry["file"].endswith(".pt")):
            raise ValueError(f"snapshot files end in .pt, got {entry['file']!r}")


def _check_cross_layer(state: Any, known: set[str]) -> None:
    """Kept moments: fractions in [0, 1], integer points, ``.pt`` files or tensors of monitored layers."""
    if not isinstance(state, Mapping):
        raise ValueError(f"cross_layer must be a dict, got {type(state).__name__}")
    for fraction, entry in state.items():
        value = float(fraction)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0) or not isinstance(entry, Mapping):
            raise ValueError(f"cross_layer moment {fraction!r} is not a fraction of training with a dict")
        for key in ("point", "epoch", "step"):
            _integer(entry[key], f"cross_layer {key}")
        if "file" in entry and not (isinstance(entry["file"], str) and entry["file"].endswith(".pt")):
            raise ValueError(f"cross_layer files end in .pt, got {entry['file']!r}")
        if "file" not in entry:
            layers = entry.get("layers")
            if not isinstance(layers, Mapping) or not all(
                isinstance(rows, Tensor) and rows.ndim == 2 for rows in layers.values()
            ):
                raise ValueError(f"cross_layer moment {fraction!r} holds neither a file nor layers of 2-D tensors")
            _layer_names(layers, known, "cross_layer")
