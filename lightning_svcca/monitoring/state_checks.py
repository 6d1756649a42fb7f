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
from collections.abc import Callable, Collection, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_svcca.core.safe_files import snapshot_problem
from lightning_svcca.output.reporting import HISTORY_FILE
from lightning_svcca.pipeline.metrics import METRICS
from lightning_svcca.pipeline.wrappers import modules_by_name, parameters_by_name

__all__ = ["integer_field", "plain_name", "validate_state"]

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
        ValueError: a field of the wrong type, one that could write outside the log folder, name something the
            model does not have, or hold a number out of range; the message names the field.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's SVCCA state is a {type(state).__name__}, not a dict")
    # layers of the model that this run does not monitor are fine: a resume with other layers keeps their rows
    known = set(layers) | set(modules_by_name(model))
    for field, check in _FIELDS.items():
        if field in state:
            _check_field(field, check, state[field], model, known)
    return dict(state)


def _check_field(field: str, check: Callable[..., Any], value: Any, model: nn.Module, known: set[str]) -> None:
    """Run one field's check; any failure becomes a ``ValueError`` that names the field."""
    try:
        if field in _OPTIONAL and value is None:
            return
        check(value, model, known)
    except ValueError as error:
        if field in str(error):
            raise
        raise ValueError(f"the checkpoint's SVCCA state field {field!r}: {error}") from error
    except Exception as error:  # noqa: BLE001 - whatever a crafted value raises, the user sees the field named
        raise ValueError(
            f"the checkpoint's SVCCA state field {field!r} is malformed: {type(error).__name__} {str(error)[:200]}"
        ) from error


def integer_field(value: Any, what: str) -> int:
    """``value`` when it is an integer in [-1, 2**62) (not a bool, float or tensor); else ``ValueError`` naming it."""
    return _integer(value, what)


def _mapping(value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _sequence(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _check_points(value: Any, *_: Any) -> None:
    for point, at in _mapping(value, "points").items():
        _integer(int(point) if isinstance(point, str) and point.lstrip("-").isdigit() else point, "points")
        if not isinstance(at, (list, tuple)) or len(at) != 2:
            raise ValueError(f"points[{point!r:.40}] must be (epoch, step), got {at!r:.80}")
        _integer(at[0], "points"), _integer(at[1], "points")


def _check_layer_integers(what: str) -> Callable[..., None]:
    """A check for ``frozen`` and ``streaks``: monitored layer -> integer."""

    def check(value: Any, model: nn.Module, known: set[str]) -> None:
        entries = _mapping(value, what)
        _layer_names(entries, known, what)
        for number in entries.values():
            _integer(number, what)

    return check


def _check_skipped(value: Any, *_: Any) -> None:
    for entry in _sequence(value, "skipped"):
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"skipped entries must be (epoch, layer, reason), got {entry!r:.80}")
        _integer(entry[0], "skipped"), _text(entry[1], "skipped"), _text(entry[2], "skipped")


def _check_names(what: str, *, layers: bool) -> Callable[..., None]:
    """A check for a list of texts (``layers``: each a layer the model has)."""

    def check(value: Any, model: nn.Module, known: set[str]) -> None:
        names = _sequence(value, what)
        for name in names:
            _text(name, what)
        if layers:
            _layer_names(names, known, what)

    return check


def _check_metrics(value: Any) -> None:
    """The metrics the snapshots were taken for: known metric names."""
    for name in _sequence(value, "metrics"):
        if name not in METRICS:
            raise ValueError(f"metrics must name metrics of {METRICS}, got {name!r:.80}")


def _check_boolean(value: Any, *_: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"initial_lost must be True or False, got {type(value).__name__}")


def _check_fingerprint(value: Any, *_: Any) -> None:
    if not isinstance(value, str) or len(value) > 1000:
        raise ValueError(f"probe_fingerprint must be a short string, got {type(value).__name__}")


def _check_csv_name(value: Any, *_: Any) -> None:
    if not (isinstance(value, str) and _CSV_NAME.fullmatch(value)):
        raise ValueError(f"csv_name must be {HISTORY_FILE} or svcca_history-<n>.csv, got {value!r:.80}")


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < _MAX_INT:
        raise ValueError(f"{what} must hold integers in [-1, 2**62), got {value!r:.80}")
    return value


def _text(value: Any, what: str, *, limit: int = 1000) -> str:
    if not isinstance(value, str) or _CONTROL.search(value) or len(value) > limit:
        raise ValueError(f"{what} must be text without control characters (at most {limit}), got {value!r:.80}")
    return value


def _layer_names(names: Any, known: set[str], what: str) -> None:
    """Every name in ``names`` (a list or a dict's keys) is a layer of the model."""
    names = list(_mapping(names, what) if not isinstance(names, (list, tuple)) else names)
    for name in names:
        _text(name, what)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"the checkpoint's {what} names layers the model does not have: {unknown[:8]}; is it the same model?"
        )


def _check_freezer(state: Any, model: nn.Module, known: set[str]) -> None:
    """Frozen blocks name monitored layers and parameters and modules of the model."""
    _mapping(state, "freezer")
    parameters, modules = set(parameters_by_name(model)), set(modules_by_name(model))
    for key, names in (("parameters", parameters), ("norm_modules", modules), ("modules", modules)):
        entries = _mapping(state.get(key, {}), f"freezer {key}")
        _layer_names(entries, known, f"freezer {key}")
        listed = [name for names_of in entries.values() for name in _sequence(names_of, f"freezer {key}")]
        for name in listed:
            _text(name, f"freezer {key}")
        missing = sorted(set(listed) - names)
        if missing:
            raise ValueError(f"the checkpoint's frozen {key} are not in the model (freezer): {missing[:8]}")
    positions = _mapping(state.get("positions", {}), "freezer positions")
    _layer_names(positions, known, "freezer positions")
    for position in positions.values():
        _integer(position, "freezer positions")


def _check_history(history: Any, model: nn.Module, known: set[str]) -> None:
    """A packed history's codes point into its name tables; its layers are monitored."""
    if not isinstance(history, Mapping):  # rows as dicts (older checkpoints)
        for row in _sequence(history, "history"):
            _integer(_mapping(row, "history rows")["epoch"], "history epoch"), _text(row["reference"], "history")
            _text(row["metric"], "history metric"), _layer_names([row["layer"]], known, "history")
            if isinstance(row["value"], bool) or not isinstance(row["value"], (int, float)):
                raise ValueError(f"history values must be numbers, got {type(row['value']).__name__}")
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
        names = _sequence(history[f"{column}_names"], f"history {column}_names")
        for name in names:
            _text(name, f"history {column}")
        codes = history[column]
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
            raise ValueError(f"history {column} codes fall outside its name table")
    _layer_names(history["layer_names"], known, "history")
    for column in ("epoch", "step"):
        if history[column].numel() and not -1 <= int(history[column].min()) <= int(history[column].max()) < _MAX_INT:
            raise ValueError(f"history {column} out of range")


def _check_snapshots(state: Any, model: nn.Module, known: set[str]) -> None:
    """Snapshot entries: plain ``.pt`` file names (read only, with ``weights_only=True``), monitored layers."""
    for joined, entry in _mapping(state, "snapshots").items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"snapshots[{joined!r:.80}] must be a dict")
        if joined == "":
            _folder(entry.get("folder"), "snapshots folder")
            continue
        layer, _, tag = _text(joined, "snapshots").rpartition("@")
        _layer_names([layer], known, "snapshots")
        _text(tag, "snapshot tag")
        if "name" not in entry and "file" not in entry and snapshot_problem(dict(entry)) is not None:
            raise ValueError(f"snapshots[{joined!r}] is not a sound snapshot: {snapshot_problem(dict(entry))}")
        if "name" in entry and not plain_name(entry["name"], "snapshot file name").endswith(".pt"):
            raise ValueError(f"snapshot file names end in .pt, got {entry['name']!r}")
        if "file" in entry and not (_folder(entry["file"], "snapshot files").endswith(".pt")):
            raise ValueError(f"snapshot files end in .pt, got {entry['file']!r:.80}")


def _folder(value: Any, what: str) -> str:
    """A stored path: text within the system's limits (4096 characters, 255 per name)."""
    _text(value, what, limit=4096)
    if any(len(part) > 255 for part in value.split("/")):
        raise ValueError(f"{what} holds a name longer than 255 characters")
    return value


def _check_cross_layer(state: Any, model: nn.Module, known: set[str]) -> None:
    """Kept moments: fractions in [0, 1], integer points, ``.pt`` files or tensors of monitored layers."""
    for fraction, entry in _mapping(state, "cross_layer").items():
        if not isinstance(fraction, (str, int, float)) or isinstance(fraction, bool) or len(str(fraction)) > 40:
            raise ValueError(f"cross_layer keys are fractions of training, got {type(fraction).__name__}")
        value = float(fraction)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0) or not isinstance(entry, Mapping):
            raise ValueError(f"cross_layer moment {fraction!r} is not a fraction of training with a dict")
        for key in ("point", "epoch", "step"):
            _integer(entry[key], f"cross_layer {key}")
        if "file" in entry and not _folder(entry["file"], "cross_layer files").endswith(".pt"):
            raise ValueError(f"cross_layer files end in .pt, got {entry['file']!r:.80}")
        if "file" not in entry:
            layers = entry.get("layers")
            if not isinstance(layers, Mapping) or not all(
                isinstance(rows, Tensor) and rows.ndim == 2 for rows in layers.values()
            ):
                raise ValueError(f"cross_layer moment {fraction!r} holds neither a file nor layers of 2-D tensors")
            _layer_names(layers, known, "cross_layer")


#: Fields that may be ``None`` (not yet set when the checkpoint was written).
_OPTIONAL = frozenset({"run_id", "csv_name", "probe_fingerprint"})

#: Every field of the state and its check (``check(value, model, known_layers)``); a field not listed is not read.
_FIELDS: dict[str, Callable[..., Any]] = {
    "version": lambda value, *_: _integer(value, "version"),
    "epoch_offset": lambda value, *_: _integer(value, "epoch_offset"),
    "last_measured_step": lambda value, *_: _integer(value, "last_measured_step"),
    "run_id": lambda value, *_: plain_name(value, "run_id"),
    "csv_name": _check_csv_name,
    "probe_fingerprint": _check_fingerprint,
    "measured": lambda value, *_: [_integer(point, "measured") for point in _sequence(value, "measured")],
    "initial_lost": _check_boolean,
    "metrics": lambda value, *_: _check_metrics(value),
    "points": _check_points,
    "layer_order": _check_names("layer_order", layers=True),
    "frozen": _check_layer_integers("frozen"),
    "streaks": _check_layer_integers("streaks"),
    "freezer": _check_freezer,
    "history": _check_history,
    "snapshots": _check_snapshots,
    "cross_layer": _check_cross_layer,
    "skipped": _check_skipped,
}
