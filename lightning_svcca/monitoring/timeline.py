"""The measurement timeline: which points of the run were measured, and which earlier point each reference means.

A measurement is identified by its *point*: the epoch when measuring per epoch, the global step when measuring
every k steps. :class:`Timeline` keeps the measured points in order with each one's ``(epoch, step)``, and answers
the look-ups that the comparisons and the frozen-prefix reuse need: the first and the latest point, the points
before a given one, and a lag (in epochs, or in measurements when measuring by steps). The monitor and
:class:`~lightning_svcca.pipeline.comparisons.Comparisons` hold the same :class:`Timeline` object; the monitor is
the only one that adds to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Timeline"]


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
    """

    def __init__(self, *, lag_in_measurements: bool = False) -> None:
        self.lag_in_measurements = lag_in_measurements
        #: The measured points, in the order they were measured.
        self.measured: list[int] = []
        #: Each point ever measured -> ``(epoch, step)`` (kept when the probe changes and ``measured`` restarts).
        self.points: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.measured)

    def __contains__(self, point: object) -> bool:
        return point in self.measured

    @property
    def first(self) -> int | None:
        """The first measured point (what ``initial`` compares with), or ``None`` before any."""
        return self.measured[0] if self.measured else None

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

    def recent(self, point: int, horizon: int) -> set[int]:
        """The measured points a lag of at most ``horizon`` can still reach from ``point`` on (``point`` included)."""
        if self.lag_in_measurements:
            return set(self.measured[-(horizon + 1) :])
        return {p for p in self.measured if p == point or p > point - horizon}

    def restart(self) -> None:
        """Forget the measured points (a new probe: nothing measured before is comparable); ``points`` stay."""
        self.measured.clear()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries ``measured`` and ``points`` (point keys as strings)."""
        return {
            "measured": list(self.measured),
            "points": {str(point): list(at) for point, at in self.points.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries; checkpoints from before steps were kept have no ``points``."""
        self.measured = list(state.get("measured", []))
        points = state.get("points") or {point: (point, -1) for point in self.measured}
        self.points = {int(point): (int(at[0]), int(at[1])) for point, at in points.items()}
