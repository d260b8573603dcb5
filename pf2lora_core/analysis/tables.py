"""Table text: a ``mean ± se`` cell with its mark, and Markdown tables (through ``tabulate``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from tabulate import tabulate

from pf2lora_core.analysis.statistics import summarize

MISSING = "-"  # a cell without a value


def cell(
    values: Iterable[float],
    fmt: str = ".3f",
    mark: str = "",
    *,
    se: bool = True,
    std: bool = False,
    interval: bool = False,
) -> str:
    """One table cell over the finite per-seed ``values`` (``pf2lora_core.analysis.statistics``).

    ``mean ± se`` by default; ``std=True`` gives ``mean ± std`` (with ``se=True`` too:
    ``mean ± std (se x)``); ``interval=True`` appends the 95% t-interval ``[low, high]``. One value
    gives its ``mean`` alone, none gives ``-``. ``mark`` (``*`` / ``≈`` of ``statistics.marks``)
    follows after a space.
    """
    s = summarize(values)
    if math.isnan(s.mean):
        return MISSING
    text = f"{s.mean:{fmt}}"
    if not math.isnan(s.se):
        if std:
            text += f" ± {s.std:{fmt}}" + (f" (se {s.se:{fmt}})" if se else "")
        elif se:
            text += f" ± {s.se:{fmt}}"
        if interval:
            text += f" [{s.low:{fmt}}, {s.high:{fmt}}]"
    return f"{text} {mark}" if mark else text


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """GitHub-flavoured Markdown table, one line per element: header, rule, then the rows.

    Cells are text already (numbers formatted by the caller, so nothing is re-parsed as a number);
    a ``|`` inside a cell is escaped. Short rows are padded with empty cells.
    """
    body = [[_escape(c) for c in row] + [""] * (len(head) - len(row)) for row in rows]
    text = tabulate(body, headers=[_escape(h) for h in head], tablefmt="github", disable_numparse=True)
    return text.splitlines()


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")
