"""Text cells of the CSV files that a spreadsheet cannot take for a formula, and back.

A spreadsheet reads a cell starting with ``=``, ``+``, ``-`` or ``@`` (and, in some, a tab or carriage return) as
a formula, so a layer or reference name from a crafted checkpoint could run one when the history is opened. Such
text cells are written with a leading ``'`` (the spreadsheet convention for "this is text"); a text cell that
itself starts with ``'`` gets one more, so :func:`restore_cell` undoes :func:`neutralise_cell` exactly. Numbers
(negative ones too) are values, not text, and are written as they are. Cells holding line breaks are quoted by
the ``csv`` module, so a CSV reader sees one cell.
"""

from __future__ import annotations

from typing import Any

__all__ = ["neutralise_cell", "restore_cell"]

#: First characters that make a spreadsheet evaluate a cell, and the escape character itself.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise_cell(value: Any) -> Any:
    """``value``, with ``'`` prepended when it is text starting like a formula (or with ``'``).

    Example:
        >>> neutralise_cell("=HYPERLINK(1)"), neutralise_cell("conv1"), neutralise_cell(-0.5)
        ("'=HYPERLINK(1)", 'conv1', -0.5)
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def restore_cell(text: str) -> str:
    """The text :func:`neutralise_cell` was given: one leading ``'`` removed.

    Example:
        >>> restore_cell("'=HYPERLINK(1)"), restore_cell("conv1")
        ('=HYPERLINK(1)', 'conv1')
    """
    return text[1:] if text.startswith("'") else text
