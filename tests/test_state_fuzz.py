"""Every field of a checkpoint's state, fuzzed by type: refused with a ValueError naming the field, or used safely.

A real state (snapshot files, a cross-layer moment, freezes) has each field, and each entry of its dict fields, set
to every value of a table of bad values (wrong types, tensors, infinities, huge numbers, empty and 1M-character
strings). Loading must either raise ``ValueError`` naming the field, or accept the value and then resume, measure
and finish without any other exception.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_svcca import FreezePolicy, SVCCACallback, SVCCAMonitor

LAYERS = ["0", "2", "4"]

#: Bad values by type: what a crafted or damaged checkpoint may hold in any field.
BAD_VALUES: list[Any] = [
    None,
    True,
    1.5,
    math.inf,
    math.nan,
    -5,
    2**70,
    "",
    "x" * 1_000_000,
    b"bytes",
    torch.tensor(1),
    torch.tensor([1.0, 2.0]),
    [],
    {},
    [None],
    [torch.tensor([1.0, 2.0])],
    {"": ""},
    {"0": ""},
    ("a", "b", "c"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def _monitor(log_dir: Path) -> SVCCAMonitor:
    probe = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    return SVCCAMonitor(
        _model(),
        probe=probe,
        layers=LAYERS,
        reference=("previous", "initial"),
        log_dir=log_dir,
        cross_layer=True,
        freeze=FreezePolicy(mode="schedule", schedule={"0": 1}),
    )


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    log_dir = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = _monitor(log_dir)
        monitor.start()
        for epoch in (1, 2):
            monitor.measure(epoch=epoch, step=epoch * 4)
        state = {**monitor.state_dict(), "epoch_offset": 0}
        monitor.close()
    return state, log_dir


def _cases(state: dict[str, Any]) -> list[tuple[str, tuple[Any, ...], Any]]:
    """``(field, path, bad value)``: each top-level field, and each entry of a dict field (one level down)."""
    cases = []
    for field, value in state.items():
        for bad in BAD_VALUES:
            cases.append((field, (field,), bad))
        if isinstance(value, dict):
            for key in list(value)[:4]:
                for bad in BAD_VALUES:
                    cases.append((field, (field, key), bad))
    return cases


def _set(state: dict[str, Any], path: tuple[Any, ...], bad: Any) -> dict[str, Any]:
    if len(path) == 1:
        return {**state, path[0]: bad}
    return {**state, path[0]: {**state[path[0]], path[1]: bad}}


def test_every_field_fuzzed_by_type_is_refused_naming_it_or_used_safely(real_state: Any) -> None:
    state, log_dir = real_state
    cases = _cases(state)
    assert len(cases) > 400 and {"epoch_offset", "initial_lost", "metrics", "points", "freezer"} <= set(state)
    refused = accepted = 0
    problems = []
    for field, path, bad in cases:
        crafted = _set(state, path, bad)
        monitor = _monitor(log_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if field == "epoch_offset":
                    SVCCACallback(probe=torch.zeros(2, 6), layers=LAYERS).load_state_dict(crafted)
                monitor.load_state_dict(crafted)
            except ValueError as error:
                refused += 1
                if field not in str(error):
                    problems.append(f"{path} = {bad!r:.40}: the error does not name {field!r}: {error}"[:300])
                continue
            except Exception as error:  # noqa: BLE001 - a raw exception is what this test looks for
                problems.append(f"{path} = {bad!r:.40}: {type(error).__name__} {error}"[:300])
                continue
            accepted += 1
            try:
                monitor.start(step=8)
                monitor.measure(epoch=3, step=12)
                monitor.finish(epoch=3, step=12)
            except Exception as error:  # noqa: BLE001
                problems.append(f"{path} = {bad!r:.40} accepted, then {type(error).__name__} {error}"[:300])
            finally:
                monitor.close()
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems[:40])
    assert refused > accepted > 0


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("epoch_offset", 1.5),
        ("epoch_offset", math.inf),
        ("initial_lost", torch.tensor([1.0, 2.0])),
        ("metrics", torch.tensor([1.0, 2.0])),
        ("points", torch.tensor([1.0, 2.0])),
        ("freezer", {"parameters": ""}),
        ("freezer", {"positions": ""}),
        ("snapshots", {"": {"folder": "x" * 1_000_000}}),
    ],
)
def test_the_issues_fuzzed_states_name_their_field(real_state: Any, field: str, bad: Any) -> None:
    """The issue's raw exceptions (TypeError, OverflowError, RuntimeError, AttributeError, OSError), now named."""
    state, log_dir = real_state
    crafted = {**state, field: bad}
    with pytest.raises(ValueError, match=field):
        if field == "epoch_offset":
            SVCCACallback(probe=torch.zeros(2, 6), layers=LAYERS).load_state_dict(crafted)
        _monitor(log_dir).load_state_dict(crafted)
