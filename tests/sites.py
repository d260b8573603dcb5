"""Small site data files with different label mixes (each site's own csv), for deployment tests."""

from __future__ import annotations

import csv
from pathlib import Path

LABELS = ["neg", "neu", "pos"]
# per site: neg, neu, pos examples (multiples of 4, so test_fraction 0.25 splits each label exactly)
MIXES = [(24, 4, 4), (4, 4, 24), (4, 20, 8)]
WORDS = ["good", "bad", "fine", "film", "plot", "actor", "scene", "music", "long", "short", "dull", "great"]


def write_site(path: Path, mix: tuple[int, ...], seed: int, extra_column: str = "") -> Path:
    """``path`` as csv (``text``, ``label``; optionally one more column): ``mix[i]`` rows of ``LABELS[i]``."""
    rows = []
    for label, count in zip(LABELS, mix, strict=True):
        for i in range(count):
            words = [WORDS[(seed * 7 + i * 3 + j) % len(WORDS)] for j in range(5)]
            extra = {extra_column: 1} if extra_column else {}
            rows.append({"text": f"{label} {seed} {i} " + " ".join(words), "label": label, **extra})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_sizes(mix: tuple[int, ...], test_fraction: float = 0.25) -> tuple[list[int], list[int]]:
    """(train, test) label histograms of a site's stratified split (exact for ``MIXES`` at 0.25)."""
    test = [round(test_fraction * c) for c in mix]
    return [c - t for c, t in zip(mix, test, strict=True)], test
