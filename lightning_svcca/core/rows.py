"""The history row: one measured value, and the names its slots may hold besides references.

A run's history is a list of rows ``{"epoch", "step", "layer", "reference", "metric", "value"}``
(:data:`HISTORY_COLUMNS`), built by :func:`row`. ``epoch`` counts completed epochs, ``step`` is the global
optimizer step. Besides the references (``previous``, ``initial``, ``final``, fixed references, lags), the reference
slot holds per-layer facts (:data:`LAYER_FACTS`): ``dims`` (directions kept), ``baseline`` (the noise floor) and
``frozen``; freeze state has a metric of its own (:data:`FREEZE_METRIC`, value 1 once a layer is frozen). Every
stage that writes or reads rows (the comparisons, the freeze coordinator, the outputs, the CLI) takes these names
from here. Pure Python: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FREEZE_METRIC", "FREEZE_REFERENCE", "HISTORY_COLUMNS", "LAYER_FACTS", "row", "values_of"]

HISTORY_COLUMNS = ("epoch", "step", "layer", "reference", "metric", "value")
#: Reference slots that are not references: per-layer facts logged beside the similarities.
LAYER_FACTS = ("dims", "baseline", "frozen")
#: The metric of freeze-state rows (their reference slot is ``"frozen"``; value 1 once the layer is frozen).
FREEZE_METRIC = "freeze"
FREEZE_REFERENCE = "frozen"


def row(epoch: int, step: int, layer: str, reference: str, metric: str, value: float) -> dict[str, Any]:
    """One history row: what was measured at ``epoch`` (completed epochs) and global ``step``.

    Example:
        >>> row(2, 20, "conv1", "previous", "svcca", 0.9)
        {'epoch': 2, 'step': 20, 'layer': 'conv1', 'reference': 'previous', 'metric': 'svcca', 'value': 0.9}
    """
    return {
        "epoch": int(epoch),
        "step": int(step),
        "layer": layer,
        "reference": reference,
        "metric": metric,
        "value": float(value),
    }


def values_of(rows: Sequence[Mapping[str, Any]], reference: str | None, metric: str) -> dict[str, float]:
    """Layer -> value of the rows of one reference and metric."""
    return {r["layer"]: r["value"] for r in rows if r["reference"] == reference and r["metric"] == metric}
