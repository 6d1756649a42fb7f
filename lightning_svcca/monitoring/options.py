"""The monitor's options as a public class's own keyword arguments, declared and documented once in MonitorConfig.

A public class (``SVCCAMonitor``, ``SVCCACallback``, ``SVCCATrainerCallback``) writes ``__init__(self, [model,]
probe, layers, reference, metrics, every_n_epochs, freeze, *, <its own keyword-only options>, **options:
Unpack[MonitorOptions])`` and builds its :class:`~lightning_svcca.monitoring.config.MonitorConfig` with
:func:`monitor_config`, which names the class and suggests the closest option for a misspelled keyword. That is
what a type checker reads: the six options that can be given by position written out, the rest from the
:class:`~lightning_svcca.monitoring.config.MonitorOptions` ``TypedDict``.

:func:`takes_monitor_options` then gives that ``__init__`` the full runtime signature (``__signature__``: every
option with its kind, type and default, then the class's own) and the class docstring every option's ``Args:``
entry. Both are what ``inspect.signature``, ``help()`` and LightningCLI (jsonargparse reads the ``__init__``
signature and the ``Args:`` docs) see, so every option can be written in a LightningCLI YAML file and shows its
documentation in ``--help``. It also checks that the options a class writes out have MonitorConfig's types and
defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from lightning_svcca.monitoring.config import MonitorConfig

__all__ = ["OPTION_NAMES", "monitor_config", "option_parameters", "takes_monitor_options", "with_option_docs"]

#: Every option of :class:`MonitorConfig`, in its order.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(MonitorConfig) if f.init)

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


def monitor_config(owner: type, *args: Any, **options: Any) -> MonitorConfig:
    """The checked :class:`MonitorConfig` of ``owner``'s constructor arguments.

    A keyword that is no option is a ``TypeError`` naming ``owner`` (not MonitorConfig) with the closest
    argument ``owner`` takes, as Python's own message would if the options were written out.
    """
    unknown = [name for name in options if name not in OPTION_NAMES]
    if unknown:
        known = list(inspect.signature(owner).parameters)
        name = unknown[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(known)}"
        raise TypeError(f"{owner.__name__}() got an unexpected keyword argument {name!r}{hint}")
    return MonitorConfig(*args, **options)


def takes_monitor_options(*, required: Collection[str] = ()) -> Callable[[_Adapter], _Adapter]:
    """Give a public class every monitor option: in its ``__init__``'s runtime signature and its ``Args:`` docs.

    The class's ``__init__`` takes ``(self, [leading arguments,] <the options that can be given by position>, *,
    <keyword-only options of its own>, **options)``; its ``__signature__`` becomes ``self`` and the leading
    arguments, every :class:`MonitorConfig` option (the first six positional or keyword, the rest keyword-only),
    then the class's own options. An option the class writes out must have MonitorConfig's type and default
    (``required`` ones: no default).

    Args:
        required: options the class needs a value for (shown without a default).
    """

    def decorate(cls: _Adapter) -> _Adapter:
        init = vars(cls)["__init__"]  # the class's own (a KeyError if it has none: a parent's is not changed)
        signature = inspect.signature(init, eval_str=True)
        given = list(signature.parameters.values())
        options = option_parameters(required=required)
        first = next(i for i, p in enumerate(given) if p.name in OPTION_NAMES)
        leading = given[:first]  # self, and what the class takes before the options (the monitor's model)
        _check_written_out([p for p in given if p.name in OPTION_NAMES], options, cls)
        own = [p for p in given[first:] if p.name not in OPTION_NAMES and p.kind is not p.VAR_KEYWORD]
        init.__signature__ = signature.replace(parameters=[*leading, *options, *own])
        cls.__doc__ = with_option_docs(cls.__doc__)
        return cls

    return decorate


def _check_written_out(written: list[inspect.Parameter], options: list[inspect.Parameter], cls: type) -> None:
    """The options ``cls`` writes out in its ``__init__`` are MonitorConfig's first ones, as MonitorConfig has them."""
    for parameter, option in zip(written, options, strict=False):
        same = (parameter.name, parameter.kind, parameter.annotation, parameter.default)
        if same != (option.name, option.kind, option.annotation, option.default):
            raise TypeError(f"{cls.__name__}.__init__ writes out {parameter} where MonitorConfig has {option}")


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
