"""Plain-text tables for the terminal: the CLI's reports and the offline comparison's printout.

Pure Python (no torch), so that ``lightning-svcca summary`` starts fast.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """An aligned text table: the header, a rule of dashes, then the rows; columns two spaces apart.

    Cells are left-aligned to the widest cell of their column; trailing spaces are stripped.

    Example:
        >>> print(format_table(["layer", "svcca"], [["conv1", "0.912"], ["fc", "0.5"]]))
        layer  svcca
        -----  -----
        conv1  0.912
        fc     0.5
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
