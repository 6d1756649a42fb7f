"""Finding a callback's checkpoint state when its settings changed since the checkpoint was written.

Lightning files each callback's state under its ``state_key``; :class:`~lightning_svcca.SVCCACallback`'s key holds
its layers, references, metrics and probe description, so two differently configured callbacks can share a
Trainer. Resumed with other settings, the key no longer matches and Lightning would drop the whole history with a
generic "callbacks used to create the checkpoint need to be provided" warning. :func:`orphaned_state` finds the
state by the callback's class instead (when exactly one state of that class is unclaimed) and says what changed;
where the choice is ambiguous it raises an error that says how to keep the history.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["describe_changes", "orphaned_state"]


def orphaned_state(
    callback: Any, callbacks: Iterable[Any], states: Mapping[Any, Any]
) -> tuple[str, Mapping[str, Any]] | None:
    """The checkpoint state (and its key) that ``callback`` should continue when its own key is missing.

    Args:
        callback: the callback whose ``state_key`` is not among ``states``.
        callbacks: every callback of the Trainer (states claimed by another one are not candidates).
        states: the checkpoint's ``"callbacks"`` entry.

    Returns:
        ``(key, state)``, or ``None`` when the checkpoint holds no unclaimed state of this class (a checkpoint
        written without the callback: a new history starts, as it should).

    Raises:
        ValueError: several unclaimed states, or several callbacks of this class without their state: which one
            continues which cannot be told.
    """
    prefix = type(callback).__qualname__ + "{"
    claimed = {other.state_key for other in callbacks}
    candidates = [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]
    if not candidates:
        return None
    orphans = [other for other in callbacks if type(other) is type(callback) and other.state_key not in states]
    if len(candidates) > 1 or len(orphans) > 1:
        listed = "\n".join(f"  {key}" for key in candidates)
        raise ValueError(
            f"the checkpoint holds {len(candidates)} {type(callback).__name__} state(s) that no callback of this"
            f" Trainer matches:\n{listed}\nand {len(orphans)} callback(s) of that class lack their state, so which"
            " history continues where cannot be told. To keep the histories, give each callback the layers,"
            " reference, metrics and probe it was saved with (the settings above); to start a new history, resume"
            " without the callback or from a checkpoint written without it"
        )
    return candidates[0], states[candidates[0]]


def describe_changes(saved_key: str, current_key: str) -> str:
    """What differs between two ``state_key`` strings, setting by setting (``layers: [...] -> [...]``)."""
    saved, current = _settings(saved_key), _settings(current_key)
    if saved is None or current is None:
        return f"saved as {saved_key}, now {current_key}"
    changed = [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in dict.fromkeys([*saved, *current])
        if saved.get(name) != current.get(name)
    ]
    return "; ".join(changed) or "no setting differs"


def _settings(key: str) -> dict[str, Any] | None:
    """The settings dict of a ``ClassName{...}`` state key (a Python literal), or ``None`` when it is not one."""
    start = key.find("{")
    try:
        settings = ast.literal_eval(key[start:]) if start >= 0 else None
    except (ValueError, SyntaxError):
        return None
    return settings if isinstance(settings, dict) else None
