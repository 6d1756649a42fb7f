"""The history in a checkpoint: rows packed into a few tensors and name tables, and back.

A history row is ``{"epoch", "step", "layer", "reference", "metric", "value"}``. Kept as a list of dicts, each row
costs a checkpoint several hundred bytes, which over a long run outgrows everything else the monitor saves; packed,
about 30 bytes, with the values bit for bit. Freeze rows of older checkpoints (``metric="svcca",
reference="frozen"``) are unpacked under their own metric, ``"freeze"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_svcca.output.reporting import upgrade_freeze_rows

__all__ = ["pack_history", "unpack_history"]


def pack_history(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The history as a few tensors and name tables; :func:`unpack_history` is its inverse."""
    names: dict[str, dict[str, int]] = {"layer": {}, "reference": {}, "metric": {}}
    codes = {key: [table.setdefault(row[key], len(table)) for row in rows] for key, table in names.items()}
    return {
        "format": "packed",
        "epoch": torch.tensor([int(row["epoch"]) for row in rows], dtype=torch.int64),
        "step": torch.tensor([int(row.get("step", row["epoch"])) for row in rows], dtype=torch.int64),
        "value": torch.tensor([float(row["value"]) for row in rows], dtype=torch.float64),
        **{key: torch.tensor(codes[key], dtype=torch.int32) for key in names},
        **{f"{key}_names": list(table) for key, table in names.items()},
    }


def unpack_history(packed: Any) -> list[dict[str, Any]]:
    """Rows from :func:`pack_history` (or from a list of row dicts, as older checkpoints hold them).

    Freeze rows come back under ``metric="freeze"`` (:func:`~lightning_svcca.output.reporting.upgrade_freeze_rows`).
    """
    if not isinstance(packed, Mapping):
        return upgrade_freeze_rows([{"step": row.get("epoch"), **row} for row in packed])
    columns = {key: packed[key].tolist() for key in ("epoch", "step", "value", "layer", "reference", "metric")}
    rows = [
        {
            "epoch": epoch,
            "step": step,
            "layer": packed["layer_names"][layer],
            "reference": packed["reference_names"][reference],
            "metric": packed["metric_names"][metric],
            "value": value,
        }
        for epoch, step, layer, reference, metric, value in zip(
            columns["epoch"],
            columns["step"],
            columns["layer"],
            columns["reference"],
            columns["metric"],
            columns["value"],
            strict=True,
        )
    ]
    return upgrade_freeze_rows(rows)
