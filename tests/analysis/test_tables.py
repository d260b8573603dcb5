"""Table cells and Markdown tables (pf2lora_core/analysis/tables.py): formats by hand, tables parsed back."""

from __future__ import annotations

import math

from pf2lora_core.analysis.tables import cell, markdown_table
from tests.helpers.markdown import table_rows


def test_cell_formats() -> None:
    values = [0.80, 0.90]  # mean 0.85, s = 0.0707, se = 0.05, t_{0.975,1} = 12.706: 0.85 ± 0.635
    assert cell(values) == "0.850 ± 0.050"
    assert cell(values, mark="*") == "0.850 ± 0.050 *"
    assert cell(values, interval=True) == "0.850 ± 0.050 [0.215, 1.485]"
    assert cell(values, std=True, interval=True) == "0.850 ± 0.071 (se 0.050) [0.215, 1.485]"
    assert cell(values, std=True, se=False) == "0.850 ± 0.071"
    assert cell([1000.0, 3000.0], ",.0f", std=True, se=False) == "2,000 ± 1,414"


def test_cell_of_one_value_or_none() -> None:
    assert cell([0.5], mark="*", interval=True) == "0.500 *"
    assert cell([]) == cell([math.nan], mark="*") == "-"
    assert cell([0.5, math.nan, 0.7]) == "0.600 ± 0.100"  # the missing seed is left out


def test_markdown_table_parses_back_to_its_cells() -> None:
    lines = markdown_table(["algorithm", "s", "acc"], [["pf2lora", "0.30", "0.850 ± 0.050 *"], ["a|b", "1e3"]])
    assert len(lines) == 4 and set(lines[1]) <= {"|", "-"}  # header, rule (no alignment colons), rows
    assert len({len(line) for line in lines}) == 1  # columns aligned
    assert table_rows("\n".join(lines)) == [
        ["algorithm", "s", "acc"],
        ["pf2lora", "0.30", "0.850 ± 0.050 *"],  # text kept: "0.30" is not re-parsed as a number
        ["a\\|b", "1e3", ""],  # a pipe escaped; a short row padded
    ]


def test_markdown_table_without_rows() -> None:
    assert table_rows("\n".join(markdown_table(["a", "b"], []))) == [["a", "b"]]
