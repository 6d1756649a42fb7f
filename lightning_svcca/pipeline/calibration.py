r"""Calibrated values: each measurement's value set against its own shuffled baseline.

Width, depth and the number of datapoints inflate CKA-type scores (and in-sample CCA) even between unrelated
representations. The monitor's ``baseline`` reference measures each layer against itself with its datapoints
shuffled, which is the value of "no shared structure" on this probe at this width (a permutation null,
Groger et al. 2026). :func:`calibrated_rows` rescales every compared value ``s`` with its layer's and metric's
baseline ``b`` of the same measurement:

.. math::
    \tilde s = \frac{s - b}{1 - b}

so that the baseline reads 0 and identity 1 whatever the layer's width; negative when ``s`` is below the null.
The rows go to the history as metric ``{metric}_calibrated`` (tag ``{metric}_calibrated/{reference}/{layer}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CALIBRATED_SUFFIX", "calibrate", "calibrated_rows"]

#: Appended to a metric's name for its calibrated rows.
CALIBRATED_SUFFIX = "_calibrated"
#: Rows of these references are not comparisons, so they are not calibrated.
_NOT_COMPARED = ("baseline", "dims", "frozen")
#: A baseline this close to 1 leaves no range to rescale into: no calibrated value.
_SATURATED = 1e-9


def calibrate(value: float, baseline: float) -> float | None:
    """``(value - baseline) / (1 - baseline)``, or ``None`` when the baseline is (about) 1 or above.

    Example:
        >>> round(calibrate(0.7, 0.4), 12), calibrate(0.4, 0.4), calibrate(1.0, 0.4), calibrate(0.9, 1.0)
        (0.5, 0.0, 1.0, None)
    """
    if not baseline < 1.0 - _SATURATED:
        return None
    return (value - baseline) / (1.0 - baseline)


def calibrated_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ``{metric}_calibrated`` row for each compared row of one measurement that has a baseline row.

    Args:
        rows: the measurement's rows (comparisons and their ``baseline`` rows, as ``Comparisons.rows_for`` gives).
    """
    baselines = {(r["layer"], r["metric"]): r["value"] for r in rows if r["reference"] == "baseline"}
    out = []
    for r in rows:
        baseline = baselines.get((r["layer"], r["metric"]))
        if r["reference"] in _NOT_COMPARED or baseline is None:
            continue
        value = calibrate(r["value"], baseline)
        if value is not None:
            out.append({**r, "metric": r["metric"] + CALIBRATED_SUFFIX, "value": round(value, 15)})
    return out
