"""The task signal beside the representations: the training loss, and when it lets freezing go ahead.

Representations alone cannot tell a network that has learnt its task from one that has not started: on a loss
plateau before learning (a BERT at chance for its first hundred steps) its layers barely move and read as
converged, and after the task has plateaued they keep moving at their pace while nothing more is learnt.
:class:`TaskSignal` keeps the training loss as the loop reports it (one mean per interval between measurements);
:class:`TaskGate` reads it: freezing waits until the loss has fallen by a real fraction of its starting level, and
once that fall has flattened the task itself says the layers below the top may stop. See ``docs/freezing.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_svcca.monitoring.timeline import fraction_lag

__all__ = ["TaskGate", "TaskSignal", "TaskVerdict"]

#: Batches whose mean loss is the starting level (fewer when the first interval is shorter).
START_BATCHES = 4


class TaskSignal:
    """The training loss reported by the loop: the starting level and one mean per measured interval.

    Losses are summed on their own device and read once per measurement, so reporting one per step costs no
    device synchronisation.
    """

    def __init__(self) -> None:
        #: Mean loss of the first :data:`START_BATCHES` batches (``None`` before any).
        self.start: float | None = None
        #: Mean loss of each interval between measurements that saw a loss, in order.
        self.levels: list[float] = []
        self._first: list[float] = []
        self._sum: torch.Tensor | float = 0.0
        self._count: torch.Tensor | float = 0.0

    def observe(self, loss: Any) -> None:
        """Add one training batch's loss (a tensor or a number); ``None`` and non-finite values are left out."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                return
            loss = loss.detach().reshape(()).float()
            if self.start is None:  # the first few batches only: reading them once is cheap
                self._first_batch(float(loss))
            finite = torch.isfinite(loss)  # stays on the loss's device: no synchronisation
            self._sum = self._sum + torch.where(finite, loss, torch.zeros_like(loss))
            self._count = self._count + finite.to(loss.dtype)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            if self.start is None:
                self._first_batch(float(loss))
            self._sum = self._sum + float(loss)
            self._count = self._count + 1

    def _first_batch(self, value: float) -> None:
        if math.isfinite(value):
            self._first.append(value)
        if len(self._first) >= START_BATCHES:
            self.start = sum(self._first) / len(self._first)

    def close_interval(self) -> float | None:
        """At a measurement: the mean loss since the last one (``None`` when the loop reported none)."""
        total, count = float(self._sum), float(self._count)
        self._sum, self._count = 0.0, 0.0
        if self.start is None and self._first:  # a first interval shorter than START_BATCHES
            self.start = sum(self._first) / len(self._first)
        if count == 0:
            return None
        self.levels.append(total / count)
        return self.levels[-1]

    @property
    def seen(self) -> bool:
        """Whether the loop reports a loss at all."""
        return bool(self.levels) or bool(self._first)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the starting level, the interval means, the first batches' losses."""
        return {"start": self.start, "levels": list(self.levels), "first": list(self._first)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing entries: nothing seen yet); a malformed entry raises ``ValueError``."""
        if not isinstance(state, Mapping):
            raise ValueError(f"the checkpoint's task entry must be a dict, got {type(state).__name__}")
        start = state.get("start")
        self.start = None if start is None else _finite(start, "task.start")
        self.levels = [_finite(value, "task.levels") for value in _listed(state.get("levels", []), "task.levels")]
        self._first = [_finite(value, "task.first") for value in _listed(state.get("first", []), "task.first")]
        self._sum, self._count = 0.0, 0.0


def _listed(value: Any, field: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"the checkpoint's {field} must be a list of numbers, got {type(value).__name__}")
    return list(value)


def _finite(value: Any, field: str) -> float:
    """``value`` as a finite float, or a ``ValueError`` naming the checkpoint field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the checkpoint's {field} must hold finite numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TaskVerdict:
    """What the training loss says at a measurement.

    Attributes:
        allows: freezing may go ahead (the loss has fallen by ``min_progress`` of its start).
        flat: the fall has flattened (the task's own relative pace is below ``flat_below``): the task has
            plateaued, whatever the representations still do.
        reason: the numbers behind both, for the freeze and waiting lines.
    """

    allows: bool
    flat: bool
    reason: str


@dataclass(frozen=True)
class TaskGate:
    """When the training loss lets a layer freeze.

    At measurement ``t`` with the loss's starting level ``L0`` and interval means ``L(1) .. L(t)``:

        progress = 1 - L(t) / L0
        pace     = (g(L(t - lag)) - g(L(t))) / (g(L0) - g(L(t))) * (t / lag)      lag = max(1, round(lag_fraction * t))

    with ``g = log`` for a positive loss (cross-entropy falls by factors: 0.05 to 0.01 late in a run is as much
    progress as 2.3 to 0.5 early on) and ``g`` the identity otherwise. ``pace`` is the loss's recent fall against
    its fall so far, normalised so that a steady fall reads 1; it is near 0 once the loss has stopped falling, and
    negative when it rises again.

    Args:
        min_progress: no layer freezes until ``progress`` reaches this: the task has to have been learnt in part
            (on a plateau before learning, the loss sits at its start while the layers barely move).
        flat_below: once ``pace`` is below this (after ``min_progress``), the task has plateaued: every layer the
            order and bounds allow may freeze, even while its representation still moves (fine-tuning: the
            encoder keeps drifting after the task has plateaued). ``0`` leaves the decision to the representations.
        wait_without_loss: with no loss reported (a loop that does not pass one), ``True`` waits forever and says
            so; ``False`` lets the representation rule decide alone, as before the gate.
    """

    min_progress: float = 0.1
    flat_below: float = 0.3
    wait_without_loss: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_progress < 1.0:
            raise ValueError(f"TaskGate.min_progress must be in [0, 1), got {self.min_progress}")
        if self.flat_below < 0.0:
            raise ValueError(f"TaskGate.flat_below must be >= 0, got {self.flat_below}")

    def verdict(self, signal: TaskSignal, lag_fraction: float) -> TaskVerdict:
        """Whether ``signal``'s loss allows freezing now, and whether it has flattened."""
        levels, start = signal.levels, signal.start
        if not levels or start is None:
            if self.wait_without_loss:
                return TaskVerdict(False, False, "no training loss reported yet")
            return TaskVerdict(True, False, "no training loss reported: the representations decide alone")
        now = levels[-1]
        progress = (start - now) / abs(start) if start else 0.0
        if progress < self.min_progress:
            return TaskVerdict(
                False,
                False,
                f"no task progress yet: training loss {now:.4g} against {start:.4g} at the start"
                f" ({100 * progress:.1f}% lower, {100 * self.min_progress:.0f}% needed)",
            )
        t = len(levels)
        lag = fraction_lag(t, lag_fraction)
        if t <= lag:
            return TaskVerdict(True, False, f"training loss {now:.4g}, {100 * progress:.0f}% below its start")
        scale = math.log if start > 0 and min(levels) > 0 else float
        pace = (scale(levels[-1 - lag]) - scale(now)) / (scale(start) - scale(now)) * (t / lag)
        flat = pace < self.flat_below
        return TaskVerdict(
            True,
            flat,
            f"training loss {now:.4g}, {100 * progress:.0f}% below its start, recent pace {pace:.2f}"
            + (f" < {self.flat_below}: the task has plateaued" if flat else ""),
        )
