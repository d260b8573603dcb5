"""Run plots: the label-distribution plot stays bounded whatever the federation's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf2lora_core.run import plots


def test_label_distribution_plots_at_most_max_plotted_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28: the plot drew every client of the federation (about 10 ms each, 40 s at 4096 clients)."""
    hists = [{"train": [k % 3, 2], "validation": [1, 0], "test": [0, 1]} for k in range(200)]
    loaded = []
    load = plots.HistogramPartitioner.load_partition
    monkeypatch.setattr(plots.HistogramPartitioner, "load_partition", lambda self, k: loaded.append(k) or load(self, k))
    plots.label_distributions(hists, ["a", "b"], tmp_path / "labels.png")
    assert (tmp_path / "labels.png").stat().st_size > 0
    assert sorted(set(loaded)) == list(range(plots.MAX_PLOTTED_CLIENTS))  # all 200 before
