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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_svcca.core.timeline import fraction_lag, lagged_index

__all__ = ["CurveReading", "TaskGate", "TaskSignal", "TaskVerdict", "read_curve"]

#: Batches whose mean loss is the starting level (fewer when the first interval is shorter).
START_BATCHES = 4


class TaskSignal:
    """The task as the loop and the probe report it: the training loss per interval, the probe's loss per point.

    Training losses are summed on their own device and read once per measurement, so reporting one per step costs
    no device synchronisation.
    """

    def __init__(self) -> None:
        #: Mean training loss of the first :data:`START_BATCHES` batches (``None`` before any).
        self.start: float | None = None
        #: Mean training loss of each interval between measurements that saw one, in order.
        self.levels: list[float] = []
        #: The probe's own loss at each measurement from the first (``None`` where the output gave none).
        self.probe: list[float | None] = []
        #: Where each value was taken, in epochs or steps: the point of each :attr:`probe` entry, the point closing
        #: each interval of :attr:`levels`, and the point the first interval opened at (the pace is read over these
        #: spans; empty in checkpoints from before they were kept, which read evenly spaced measurements).
        self.probe_points: list[int] = []
        self.level_points: list[int] = []
        #: The loss of knowing only the probe labels' frequencies (:func:`~.pipeline.probe_loss.label_entropy`),
        #: set from the probe at each fit's start: the probe's loss must fall below it to count as progress.
        self.prior: float | None = None
        self.start_point: int | None = None
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

    def forget_probe(self) -> None:
        """Stop reading the probe's curve for the rest of the run (a resume with another probe).

        Its values would start from a new level late in the run, where no progress shows: the gate would wait
        forever. A ``None`` start keeps the curve unread, also across later checkpoints; the training loss gates.
        """
        self.probe = [None]  # its points stay: they place the training loss's intervals (probe_positions: None)

    def close_interval(self, probe_loss: float | None = None, point: int | None = None) -> float | None:
        """At a measurement: keep the probe's loss; the mean training loss since the last one (``None``: none).

        ``point``: the measurement's epoch or step, where both values are placed (without points, the measurements
        are read as evenly spaced).
        """
        opened_at = self.probe_points[-1] if self.probe_points else None  # the last measurement's point
        self.probe.append(probe_loss if probe_loss is not None and math.isfinite(probe_loss) else None)
        if point is not None:
            self.probe_points.append(int(point))
        total, count = float(self._sum), float(self._count)
        self._sum, self._count = 0.0, 0.0
        if self.start is None and self._first:  # a first interval shorter than START_BATCHES
            self.start = sum(self._first) / len(self._first)
        if count == 0:
            return None
        if not self.levels:
            self.start_point = 0 if opened_at is None else opened_at  # a first interval opens where training began
        self.levels.append(total / count)
        if point is not None:
            self.level_points.append(int(point))
        return self.levels[-1]

    def probe_positions(self) -> list[int] | None:
        """The point of each :attr:`probe` entry, or ``None`` when they are not all known (read evenly spaced)."""
        return list(self.probe_points) if len(self.probe_points) == len(self.probe) else None

    def level_positions(self) -> list[int] | None:
        """The start's point, then each :attr:`levels` entry's, or ``None`` when not all are known."""
        if self.start_point is None or len(self.level_points) != len(self.levels):
            return None
        return [self.start_point, *self.level_points]

    @property
    def seen(self) -> bool:
        """Whether the loop reports a loss at all."""
        return bool(self.levels) or bool(self._first)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the starting level, the interval means, the first batches' losses."""
        return {
            "start": self.start,
            "levels": list(self.levels),
            "first": list(self._first),
            "probe": list(self.probe),
            "probe_points": list(self.probe_points),
            "level_points": list(self.level_points),
            "start_point": self.start_point,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing entries: nothing seen yet); a malformed entry raises ``ValueError``."""
        if not isinstance(state, Mapping):
            raise ValueError(f"the checkpoint's task entry must be a dict, got {type(state).__name__}")
        start = state.get("start")
        self.start = None if start is None else _finite(start, "task.start")
        self.levels = [_finite(value, "task.levels") for value in _listed(state.get("levels", []), "task.levels")]
        self._first = [_finite(value, "task.first") for value in _listed(state.get("first", []), "task.first")]
        self.probe = [
            None if value is None else _finite(value, "task.probe")
            for value in _listed(state.get("probe", []), "task.probe")
        ]
        self.probe_points = [
            _point(value, "task.probe_points") for value in _listed(state.get("probe_points", []), "task.probe_points")
        ]
        self.level_points = [
            _point(value, "task.level_points") for value in _listed(state.get("level_points", []), "task.level_points")
        ]
        self.start_point = (
            None if state.get("start_point") is None else _point(state["start_point"], "task.start_point")
        )
        self._sum, self._count = 0.0, 0.0


def _listed(value: Any, field: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"the checkpoint's {field} must be a list of numbers, got {type(value).__name__}")
    return list(value)


def _point(value: Any, field: str) -> int:
    """``value`` as an epoch or step (a non-negative int), or a ``ValueError`` naming the checkpoint field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the checkpoint's {field} must hold epochs or steps (integers >= 0), got {value!r}")
    return value


def _finite(value: Any, field: str) -> float:
    """``value`` as a finite float, or a ``ValueError`` naming the checkpoint field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"the checkpoint's {field} must hold finite numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TaskVerdict:
    """What the task's losses say at a measurement.

    Attributes:
        allows: freezing may go ahead (every loss read has fallen by ``min_progress`` of its start).
        flat: the fall has flattened (the relative pace of the probe's loss, else the training loss's, is below
            ``flat_below``): the task has plateaued, whatever the representations still do.
        reason: the numbers behind both, for the freeze and waiting lines.
    """

    allows: bool
    flat: bool
    reason: str


@dataclass(frozen=True)
class CurveReading:
    """One loss curve as the gate reads it: its fall so far, its recent pace (``None`` before a lag can be read).

    ``progress`` is measured from ``start``, or from ``prior`` (the labels' entropy) when that is lower: a
    classifier that has learnt the class frequencies only has made no progress on its task.
    """

    name: str
    start: float
    now: float
    best: float
    progress: float
    pace: float | None
    lag: int
    prior: float | None = None

    def above_best(self) -> float:
        """How far the current value is above the best so far, as a fraction of the best's size."""
        return (self.now - self.best) / abs(self.best) if self.best else 0.0

    def describe(self) -> str:
        """The reading in words, for the freeze and waiting lines."""
        pace = "" if self.pace is None else f", recent pace {self.pace:.2f}"
        above = f", {100 * self.above_best():.0f}% above its best" if self.now > self.best else ""
        side = f"{100 * self.progress:.0f}% below" if self.progress >= 0 else f"{-100 * self.progress:.0f}% above"
        if self.prior is not None and self.prior < self.start:
            level = f"the labels' entropy {self.prior:.4g}, its start {self.start:.4g}"
            return f"{self.name} {self.now:.4g} ({side} {level}{pace}{above})"
        return f"{self.name} {self.now:.4g} ({side} its start {self.start:.4g}{pace}{above})"


@dataclass(frozen=True)
class TaskGate:
    """When the task's losses let a layer freeze.

    Two curves are read, each from its own start ``L0`` through its values ``L(1) .. L(t)`` at the measurements:
    the training loss the loop reports (interval means), and the probe's own loss (at each measurement; a probe
    from validation data makes it a held-out loss, see :mod:`~lightning_svcca.pipeline.probe_loss`):

        progress = 1 - L(t) / L0
        pace     = (g(L(t - lag)) - g(L(t))) / (g(L0) - g(L(t))) * (t / lag)      lag = max(1, round(lag_fraction * t))

    with ``g = log`` for a positive loss (cross-entropy falls by factors: 0.05 to 0.01 late in a run is as much
    progress as 2.3 to 0.5 early on) and ``g`` the identity otherwise. ``pace`` is the recent fall against the fall
    so far, normalised so that a steady fall reads 1; it is near 0 once the loss has stopped falling, and negative
    when it rises again (a held-out loss past its best).

    Args:
        min_progress: no layer freezes until every curve's ``progress`` reaches this: the task has to have been
            learnt in part (on a plateau before learning, the loss sits at its start while the layers barely move).
        flat_below: once the probe's loss (else the training loss) has a ``pace`` below this, and sits within
            ``near_best`` of its best value so far, the task has plateaued: every layer the order and bounds allow
            may freeze, even while its representation still moves (fine-tuning: the encoder keeps drifting after
            the held-out loss has stopped falling). ``0`` leaves the decision to the representations.
        min_window: the fewest measurements the recent window (``lag``) may span for a pace to count: with one
            (``t = 2`` at the default lag fraction), one measurement of a few hundred held-out samples decides,
            and its noise can read as a plateau (the benchmark's (c): flat at epoch 2, 0.4 points lost).
        patience: consecutive measurements the loss must read flat: one reading can dip by noise (the LoRA
            fine-tune (d), seed 1, read flat at epoch 3 while its held-out accuracy still rose from 76.3 to 78.3,
            and freezing there cost 1.0 point).
        near_best: how far above its best value so far a flat loss may sit (a fraction of the best). A loss that
            has jumped well above its best is in an unstable phase (a high learning rate early from scratch: the
            held-out loss of the benchmark's (a) went 0.82, 1.03, 0.14 at epochs 2-4), not on a plateau; a loss
            past its best by overfitting creeps up by a few percent.
        wait_without_loss: with no loss read at all (a loop that reports none, a probe without labels), ``True``
            waits forever and says so; ``False`` lets the representation rule decide alone.
        label_prior: measure the probe loss's progress from the entropy of the probe's labels when that is below
            its start: a classifier that has learnt only how often each class occurs sits at that entropy, and on
            an imbalanced task its loss falls far from its start by doing so (a keyword-count task with 83% of one
            class: 0.68 to 0.44 in 12 steps, then flat for 100 steps before it learnt the task; the gate read that
            plateau as the end of learning, froze every layer at step 48 and the run ended at 82.8% against 95.0%).
    """

    min_progress: float = 0.1
    flat_below: float = 0.3
    min_window: int = 2
    patience: int = 2
    near_best: float = 0.1
    wait_without_loss: bool = False
    label_prior: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_progress < 1.0:
            raise ValueError(f"TaskGate.min_progress must be in [0, 1), got {self.min_progress}")
        for name in ("min_window", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskGate.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("flat_below", "near_best"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"TaskGate.{name} must be >= 0, got {getattr(self, name)}")

    def verdict(self, signal: TaskSignal, lag_fraction: float) -> TaskVerdict:
        """Whether ``signal``'s losses allow freezing now, and whether the task has plateaued."""
        readings = self._readings(signal, 0, lag_fraction)
        if not readings:
            if self.wait_without_loss:
                return TaskVerdict(False, False, "no loss read yet (training or probe)")
            return TaskVerdict(True, False, "no loss read: the representations decide alone")
        described = "; ".join(reading.describe() for reading in readings)
        short = [reading for reading in readings if reading.progress < self.min_progress]
        if short:
            needed = f"{100 * self.min_progress:.0f}% needed"
            return TaskVerdict(False, False, f"no task progress yet: {described}; {needed}")
        # the probe's loss when there is one (what generalises), flat at this and the last patience - 1 measurements
        flats = 0
        while flats < self.patience and self._flat_at(signal, flats, readings[0].name, lag_fraction):
            flats += 1
        flat = flats >= self.patience
        plateaued = (
            f": the {readings[0].name} has plateaued (pace < {self.flat_below} over {self.min_window}+"
            f" measurements, near its best, {self.patience} time(s) in a row)"
            if flat
            else ""
        )
        return TaskVerdict(True, flat, described + plateaued)

    def _flat_at(self, signal: TaskSignal, back: int, name: str, lag_fraction: float) -> bool:
        """Whether the curve ``name`` read flat ``back`` measurements ago (recent pace low, near its best)."""
        readings = self._readings(signal, back, lag_fraction)
        if not readings or readings[0].name != name or readings[0].pace is None or readings[0].lag < self.min_window:
            return False
        return readings[0].pace < self.flat_below and readings[0].above_best() <= self.near_best

    def _readings(self, signal: TaskSignal, back: int, lag_fraction: float) -> list[CurveReading]:
        """The probe's loss curve (first, when there is one) and the training loss's, read ``back`` measurements ago.

        ``back = 0``: now. Each curve's pace is read over the epochs or steps its values were taken at, when known.
        """
        levels, probe = signal.levels[: len(signal.levels) - back], signal.probe[: len(signal.probe) - back]
        probe_at, levels_at, label_prior = signal.probe_positions(), signal.level_positions(), self.label_prior
        found = (
            read_curve(
                "probe loss", probe[0] if probe else None, probe[1:], lag_fraction,
                None if probe_at is None else probe_at[: len(probe)], prior=signal.prior if label_prior else None,
            ),
            read_curve(
                "training loss", signal.start, levels, lag_fraction,
                None if levels_at is None else levels_at[: len(levels) + 1],
            ),
        )  # fmt: skip
        return [reading for reading in found if reading is not None]


def read_curve(
    name: str,
    start: float | None,
    values: Sequence[float | None],
    lag_fraction: float,
    positions: Sequence[int] | None = None,
    *,
    prior: float | None = None,
) -> CurveReading | None:
    """A loss curve's progress, pace and best value, as :class:`TaskGate` reads it (``None`` without a value).

    ``positions``: the epoch or step of the start and of each value (``len(values) + 1`` of them). The lagged value
    is then the latest one at least ``lag_fraction`` of the time back, and the pace's ``t / lag`` the ratio of the
    spans since the start and since it: both as counting measurements gives when they are evenly spaced (``None``:
    evenly spaced). ``prior``: the loss of knowing the label frequencies only; progress is measured from it when it
    is below ``start``.
    """
    if start is None or not values or values[-1] is None:
        return None
    now, t = values[-1], len(values)
    best = min(value for value in values if value is not None)
    level = min(start, prior) if prior is not None and prior > 0 else start
    progress = (level - now) / abs(level) if level else 0.0
    placed = positions is not None and len(positions) == t + 1 and all(map(int.__lt__, positions, positions[1:]))
    lag = t - lagged_index(positions[:t], positions[t], lag_fraction) if placed else fraction_lag(t, lag_fraction)
    before = values[-1 - lag] if t > lag else None
    if before is None or start == now:
        return CurveReading(name, start, now, best, progress, None, lag, prior)
    scale = math.log if start > 0 and now > 0 and before > 0 else float
    ratio = (positions[t] - positions[0]) / (positions[t] - positions[t - lag]) if placed else t / lag
    pace = (scale(before) - scale(now)) / (scale(start) - scale(now)) * ratio
    return CurveReading(name, start, now, best, progress, pace, lag, prior)
