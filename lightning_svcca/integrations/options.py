"""The monitor's options as an adapter's own keyword arguments, declared and documented once in MonitorConfig.

An adapter writes ``__init__(self, *args, <its own keyword-only options>, **options)`` and hands ``args`` and
``options`` to :class:`~lightning_svcca.monitoring.config.MonitorConfig`. :func:`takes_monitor_options` then gives
that ``__init__`` the full signature (``__signature__``: every option with its kind, type and default, then the
adapter's own) and the class docstring every option's ``Args:`` entry. Both are what ``inspect.signature``,
``help()``, IDEs and LightningCLI (jsonargparse reads the ``__init__`` signature and the ``Args:`` docs) see, so
every option can be written in a LightningCLI YAML file and shows its documentation in ``--help``.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Collection
from typing import TypeVar

from lightning_svcca.monitoring.config import MonitorConfig

__all__ = ["option_parameters", "takes_monitor_options", "with_option_docs"]

_Adapter = TypeVar("_Adapter", bound=type)

#: The first line of a Google-style ``Args:`` entry (after ``inspect.cleandoc``): ``    name: ...`` or
#: ``    name (type): ...``.
_ENTRY = re.compile(r"^    (\*{0,2}\w+)(?: \([^)]*\))?:")


def option_parameters(*, required: Collection[str] = ()) -> list[inspect.Parameter]:
    """Every option of :class:`MonitorConfig` as a parameter: its kind, evaluated type and default.

    Args:
        required: options the adapter needs a value for (their default is dropped).
    """
    types = typing.get_type_hints(MonitorConfig)
    parameters = list(inspect.signature(MonitorConfig).parameters.values())
    return [
        parameter.replace(
            annotation=types[parameter.name],
            default=inspect.Parameter.empty if parameter.name in required else parameter.default,
        )
        for parameter in parameters
    ]


def with_option_docs(doc: str | None) -> str:
    """``doc`` with every option's ``Args:`` entry from MonitorConfig's docstring, ahead of the adapter's own.

    An entry ``doc`` writes for an option replaces the option's own (the adapter says what differs there);
    ``doc`` gets an ``Args:`` section if it has none.
    """
    head, own_entries, tail = _split_args(inspect.cleandoc(doc or ""))
    _, option_entries, _ = _split_args(inspect.cleandoc(MonitorConfig.__doc__ or ""))
    entries = {name: own_entries.get(name, lines) for name, lines in option_entries.items()}
    entries.update(own_entries)  # replaces in place, or appends the adapter's own options after the monitor's
    args = ["Args:", *(line for lines in entries.values() for line in lines)]
    return "\n".join([*head, *args, *tail]).rstrip() + "\n"


def takes_monitor_options(*, required: Collection[str] = ()) -> Callable[[_Adapter], _Adapter]:
    """Give an adapter class every monitor option: in its ``__init__`` signature and its ``Args:`` docs.

    The class's ``__init__`` takes ``(self, *args, <keyword-only options of its own>, **options)``; its
    ``__signature__`` becomes ``self``, every :class:`MonitorConfig` option (the first six positional or
    keyword, the rest keyword-only), then the adapter's own options.

    Args:
        required: options the adapter needs a value for (shown without a default).
    """

    def decorate(cls: _Adapter) -> _Adapter:
        init = vars(cls)["__init__"]  # the class's own (a KeyError if it has none: a parent's is not changed)
        signature = inspect.signature(init, eval_str=True)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        self_parameter, *own = (p for p in signature.parameters.values() if p.kind not in variadic)
        parameters = [self_parameter, *option_parameters(required=required), *own]
        init.__signature__ = signature.replace(parameters=parameters)
        cls.__doc__ = with_option_docs(cls.__doc__)
        return cls

    return decorate


def _split_args(doc: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """A cleaned docstring's lines before its ``Args:`` section, the section's entries by name, the lines after."""
    lines = doc.splitlines()
    if "Args:" not in lines:
        return [*lines, ""] if lines else [], {}, []
    start = lines.index("Args:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    entries: dict[str, list[str]] = {}
    for line in lines[start + 1 : end]:
        match = _ENTRY.match(line)
        if match:
            name = match.group(1)
            entries[name] = []
        if entries and line.strip():
            entries[name].append(line)
    tail = lines[end:]
    return lines[:start], entries, ["", *tail] if tail else []
