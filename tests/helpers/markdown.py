"""Reading Markdown tables back in tests: rows as lists of stripped cells, independent of alignment."""

from __future__ import annotations

import re


def table_rows(text: str) -> list[list[str]]:
    """Every table line of ``text`` (``| a | b |``) as its cells; rules (``|---|``) left out."""
    rows = []
    for line in text.splitlines():
        if not (line.startswith("|") and line.endswith("|")) or set(line) <= {"|", "-", ":", " "}:
            continue
        cells = re.split(r"(?<!\\)\|", line[1:-1])  # an escaped pipe stays inside its cell
        rows.append([c.strip() for c in cells])
    return rows


def row_of(text: str, *first: str) -> list[str]:
    """The one table row of ``text`` whose leading cells are ``first``."""
    (row,) = [r for r in table_rows(text) if r[: len(first)] == list(first)]
    return row
