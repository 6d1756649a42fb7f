"""The measurement timeline: which points of the run were measured, and which earlier point each reference means.

A measurement is identified by its *point*: the epoch when measuring per epoch, the global step when measuring
every k steps. :class:`Timeline` keeps the measured points in order with each one's ``(epoch, step)``, and answers
the look-ups that the comparisons and the frozen-prefix reuse need: the first and the latest point, the points
before a given one, and a lag (in epochs, or in measurements when measuring by steps, or a fraction of the
measurements so far: :func:`fraction_lag`). The monitor and
:class:`~lightning_svcca.pipeline.comparisons.Comparisons` hold the same :class:`Timeline` object; the monitor is
the only one that adds to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = ["Timeline", "evenly_spaced", "fraction_lag", "fraction_target", "lagged_index"]

T = TypeVar("T")


#: Slack on comparisons of fractions of the run: ``0.1 * 30`` is ``3.0000000000000004`` in floating point.
_SLACK = 1e-9


def fraction_lag(measurement: int, fraction: float) -> int:
    """A lag that grows with the run: ``max(1, ceil(fraction * measurement))`` measurements.

    ``measurement`` counts the measurements since the first; the window spans at least ``fraction`` of them (at the
    default ``fraction = 0.5`` this is ``floor(measurement / 2 + 1/2)``). It is :meth:`Timeline.lagged_by_fraction`'s
    lag when measurements are evenly spaced. For ``fraction <= 1`` the lagged measurement ``measurement - lag``
    never moves back as the run goes on, so snapshots it has passed are never needed again.
    """
    return max(1, math.ceil(fraction * measurement - _SLACK))


def fraction_target(point: int, origin: int, fraction: float) -> float:
    """The point ``fraction`` of the way back from ``point`` to ``origin``: a lagged point lies at or before it."""
    return point - fraction * (point - origin) + _SLACK * max(1, point - origin)


def lagged_index(earlier: Sequence[int], point: int, fraction: float) -> int:
    """The index in ``earlier`` of the latest point at least ``fraction`` of the run back from ``point``.

    ``earlier``: the ascending points before ``point``, the first one the run's origin. The movement rule's lagged
    snapshot and the task gate's lagged loss are both picked this way.
    """
    target = fraction_target(point, earlier[0], fraction)
    return max(index for index, at in enumerate(earlier) if at <= target)


def evenly_spaced(items: Sequence[T], most: int) -> list[T]:
    """At most ``most`` of ``items``, evenly spaced, the first and the last included.

    Keeps what a long run shows bounded: the heatmap's epoch columns, the epochs of the live learning-dynamics
    picture. Item ``round(i * (len(items) - 1) / (most - 1))`` for ``i < most``; all of them when there are few.

    Example:
        >>> evenly_spaced(list(range(10)), 4)
        [0, 3, 6, 9]
    """
    if len(items) <= most:
        return list(items)
    picks = {round(i * (len(items) - 1) / max(most - 1, 1)) for i in range(most)}
    return [items[i] for i in sorted(picks)]


class Timeline:
    """The measured points of a run, in order, and each one's ``(epoch, step)``.

    Args:
        lag_in_measurements: a lag counts measurements back (measuring by steps), not epochs.

    Example:
        >>> timeline = Timeline()
        >>> timeline.add(0, epoch=0, step=0)
        >>> timeline.add(2, epoch=2, step=20)
        >>> timeline.previous(3), timeline.lagged(3, 2), timeline.at(2)
        (2, 1, (2, 20))
        >>> timeline.lagged_by_fraction(3, 0.25)  # the latest point at least 3 / 4 epochs back (at or before 2.25)
        2
        >>> timeline.span_by_fraction(3, 0.25)  # 3 epochs since the first point, 1 since the lagged one
        (3, 1)
    """

    def __init__(self, *, lag_in_measurements: bool = False) -> None:
        self.lag_in_measurements = lag_in_measurements
        #: The measured points, in the order they were measured.
        self.measured: list[int] = []
        #: Each point ever measured -> ``(epoch, step)`` (kept when the probe changes and ``measured`` restarts).
        self.points: dict[int, tuple[int, int]] = {}
        #: The snapshots of the run's first point were dropped (a changed probe or metrics): ``initial`` has none.
        self.initial_lost = False

    def __len__(self) -> int:
        return len(self.measured)

    def __contains__(self, point: object) -> bool:
        return point in self.measured

    @property
    def first(self) -> int | None:
        """The first measured point (what ``initial`` compares with), or ``None`` before any or once it was lost."""
        return self.measured[0] if self.measured and not self.initial_lost else None

    @property
    def latest(self) -> int | None:
        """The last measured point, or ``None`` before any."""
        return self.measured[-1] if self.measured else None

    def add(self, point: int, epoch: int, step: int) -> None:
        """Append a measured point."""
        self.points[point] = (int(epoch), int(step))
        self.measured.append(point)

    def at(self, point: int) -> tuple[int, int]:
        """``(epoch, step)`` of a measured point."""
        return self.points[point]

    def before(self, point: int) -> list[int]:
        """The measured points before ``point``, in order."""
        return [p for p in self.measured if p < point]

    def previous(self, point: int) -> int | None:
        """The last measured point before ``point`` (what ``previous`` compares with), or ``None``."""
        earlier = self.before(point)
        return earlier[-1] if earlier else None

    def lagged(self, point: int, lag: int) -> int | None:
        """The point ``lag`` back from ``point``: ``lag`` measurements earlier, or ``lag`` epochs earlier.

        ``None`` when nothing was measured before ``point`` or, counting measurements, fewer than ``lag`` were. A
        point ``lag`` epochs back need not have been measured (the store then has no snapshot for it).
        """
        earlier = self.before(point)
        if not earlier:
            return None
        if not self.lag_in_measurements:
            return point - lag
        return earlier[-lag] if len(earlier) >= lag else None

    def lagged_by_fraction(self, point: int, fraction: float) -> int | None:
        """The latest measured point at least ``fraction`` of the run back from ``point``; ``None`` before any.

        The run is measured in points (epochs or steps) from the first measured one, so the recent window spans at
        least ``fraction`` of the time whatever the spacing: with every_n_train_steps the callbacks also measure at
        epoch ends, and a point 4 steps back would otherwise count as a whole measurement. Evenly spaced, this is
        :func:`fraction_lag` measurements back.
        """
        earlier = self.before(point)
        return earlier[lagged_index(earlier, point, fraction)] if earlier else None

    def lag_by_fraction(self, point: int, fraction: float) -> int | None:
        """How many measurements back :meth:`lagged_by_fraction` lies (``None`` before any)."""
        earlier = self.before(point)
        return len(earlier) - lagged_index(earlier, point, fraction) if earlier else None

    def span_by_fraction(self, point: int, fraction: float) -> tuple[int, int] | None:
        """How far back the first measured point and the :meth:`lagged_by_fraction` one lie, in epochs or steps.

        ``(point - first, point - lagged)``; ``None`` before a lagged point or without the first one.

        A ratio of counts (``t / lag``) is this ratio only when measurements are evenly spaced; a resume that changed
        ``every_n_epochs`` spaces them unevenly, and the freeze rule's pace is read from the spans instead.
        """
        lagged = self.lagged_by_fraction(point, fraction)
        first = self.first
        if lagged is None or first is None or lagged >= point:
            return None
        return point - first, point - lagged

    def reachable_by_fraction(self, point: int, fraction: float) -> set[int]:
        """The measured points a fraction lag can still reach from the measurement after ``point`` on.

        A later point is at least ``point + 1`` (epochs and steps are integers) and its target
        (:func:`fraction_target`) is never earlier than that of ``point + 1``, so the latest measured point at or
        before that target, and every one after it, are all that can still be lagged points.
        """
        if not self.measured:
            return set()
        target = fraction_target(point + 1, self.measured[0], fraction)
        reachable = [p for p in self.measured if p <= target]
        start = reachable[-1] if reachable else self.measured[0]
        return {p for p in self.measured if p >= start}

    def recent(self, point: int, horizon: int) -> set[int]:
        """The measured points a lag of at most ``horizon`` can still reach from ``point`` on (``point`` included)."""
        if self.lag_in_measurements:
            return set(self.measured[-(horizon + 1) :])
        return {p for p in self.measured if p == point or p > point - horizon}

    def restart(self) -> None:
        """Forget the measured points (a new probe: nothing measured before is comparable); ``points`` stay.

        The run's first point is gone for good: ``initial`` has nothing to compare with from now on.
        """
        self.measured.clear()
        self.initial_lost = True

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries ``measured``, ``points`` (point keys as strings) and ``initial_lost``."""
        return {
            "measured": list(self.measured),
            "points": {str(point): list(at) for point, at in self.points.items()},
            "initial_lost": self.initial_lost,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries; checkpoints from before steps were kept have no ``points``."""
        self.measured = list(state.get("measured", []))
        points = state.get("points") or {point: (point, -1) for point in self.measured}
        self.points = {int(point): (int(at[0]), int(at[1])) for point, at in points.items()}
        self.initial_lost = bool(state.get("initial_lost", False))
