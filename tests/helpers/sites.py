"""Small site data files with different label mixes (each site's own csv), for deployment tests."""

from __future__ import annotations

import csv
from pathlib import Path

LABELS = ["neg", "neu", "pos"]
# per site: neg, neu, pos examples (multiples of 4, so test_fraction = val_fraction = 0.25 split each
# label exactly: a quarter to test, a quarter to validation, half to train)
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


def split_sizes(mix: tuple[int, ...]) -> dict[str, list[int]]:
    """Label histograms of a site's stratified split at test_fraction = val_fraction = 0.25 (exact for ``MIXES``)."""
    quarter = [c // 4 for c in mix]
    return {"train": [c - 2 * q for c, q in zip(mix, quarter, strict=True)], "validation": quarter, "test": quarter}
