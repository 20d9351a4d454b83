"""Aligned plain-text tables, as `docker service ls` prints them.

Columns are left-aligned and separated by three spaces; the last column is not
padded, so no line ends in blanks. Given a width (the terminal's), the widest
columns give up characters until the table fits, and their cut cells end in
an ellipsis; piped output (width None) is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence

GAP = "   "
ELLIPSIS = "…"
MIN_COLUMN = 6  # a column is never cut below this many characters (or its header)


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> str:
    """The table as text, one line per row after the header line, without a final newline."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    if width is not None:
        widths = fit(widths, [len(h) for h in headers], width)
    return "\n".join(_line(row, widths) for row in [headers, *rows])


def fit(widths: list[int], floors: list[int], limit: int) -> list[int]:
    """Narrow the widest columns, one character at a time, until the table is `limit` wide."""
    widths = list(widths)
    floors = [max(floor, MIN_COLUMN) for floor in floors]
    while sum(widths) + len(GAP) * (len(widths) - 1) > limit:
        shrinkable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    cut = [_cut(cell, w) for cell, w in zip(cells, widths, strict=True)]
    padded = [cell.ljust(w) for cell, w in zip(cut[:-1], widths, strict=False)]
    return GAP.join([*padded, cut[-1]]).rstrip()


def _cut(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[: width - 1] + ELLIPSIS


def short_id(object_id: str) -> str:
    """The first 12 characters of an id, as docker shows them."""
    return object_id[:12]
