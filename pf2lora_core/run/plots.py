"""PNG plots of a run: per-round curves, per-client bars, rank spectra (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import datasets
import matplotlib.pyplot as plt
from flwr_datasets.partitioner import Partitioner

from pf2lora_core.config.keys import GLOBAL, PERSONALIZED
from pf2lora_core.run.records import RoundRecord, Summary

LABEL = "label"  # the label column of the partitions label_distributions plots
# label_distributions draws one bar per client: past this many the bars are unreadable and the
# plot costs about 10 ms a client (40 s at 4096), so a larger federation shows its first clients.
MAX_PLOTTED_CLIENTS = 64


def round_curves(history: Sequence[RoundRecord], path: Path) -> None:
    """Train loss and mean personalized / global metric per round."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r.round for r in history]
    ax_loss.plot(rounds, [float("nan") if r.train_loss is None else r.train_loss for r in history], marker="o")
    ax_loss.set(xlabel="round", ylabel="train loss (weighted)", title="training")
    evald = [r for r in history if r.evaluated]
    for kind in (PERSONALIZED, GLOBAL):
        xs = [r.round for r in evald]
        ax_metric.plot(xs, [r.kinds[kind].mean for r in evald], marker="o", label=f"{kind} mean")
        ax_metric.plot(xs, [r.kinds[kind].worst for r in evald], ls="--", label=f"{kind} worst")
    metric = evald[0].kinds[PERSONALIZED].metric if evald else ""
    ax_metric.set(xlabel="round", ylabel=metric, title="evaluation")
    ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def client_bars(summary: Summary, path: Path) -> None:
    """Personalized and global metric per client (a client without the value: no bar)."""
    metric, clients = summary.metric, summary.clients
    xs = range(len(clients))
    fig, ax = plt.subplots(figsize=(max(6, len(clients) * 0.7), 4))
    w = 0.4
    for kind, shift in ((PERSONALIZED, -w / 2), (GLOBAL, w / 2)):
        values = [c.value(kind, metric) for c in clients]
        ax.bar([x + shift for x in xs], [v if math.isfinite(v) else 0.0 for v in values], w, label=kind)
    ax.set_xticks(list(xs), [str(c.client) for c in clients])
    ax.set(xlabel="client", ylabel=metric, title=f"{summary.algorithm}: per-client {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rank_spectra(
    spectra: Mapping[str, Sequence[float]], path: Path, title: str, true_ranks: Mapping[str, int] | None = None
) -> None:
    """Normalised singular values (log scale) per client; dashed line at the true rank if known."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, sv in spectra.items():
        if not sv or sv[0] == 0:
            continue
        line = ax.semilogy(range(1, len(sv) + 1), [s / sv[0] for s in sv], marker="o", ms=3, label=label)[0]
        if true_ranks and label in true_ranks:
            ax.axvline(true_ranks[label] + 0.5, color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="index", ylabel="sigma_i / sigma_1", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_plots(run: Any, history: Sequence[RoundRecord], summary: Summary) -> None:
    """All plots of a federated run into ``run.plots``."""
    if history:
        round_curves(history, run.plots / "rounds.png")
    if summary.clients:
        client_bars(summary, run.plots / "clients.png")
        spectra = {}
        for c in summary.clients:
            if c.rank.modules:
                first = sorted(c.rank.modules)[0]
                spectra[f"client {c.client}"] = list(c.rank.modules[first].singular_values)
        if spectra:
            rank_spectra(spectra, run.plots / "rank_spectra.png", "update spectrum (first adapted module)")
    hists = summary.label_histograms
    if hists and all(h and any(sum(v) for v in h.values()) for h in hists):
        names = [f"label {i}" for i in range(len(next(iter(hists[0].values()))))]
        label_distributions(hists, names, run.plots / "label_distribution.png")


class HistogramPartitioner(Partitioner):
    """The run's client splits as a flwr-datasets ``Partitioner`` of label rows (for its plots).

    ``histograms[k][split]`` counts client k's examples per label id (``summary.json``'s
    ``label_histogram``); partition k is one row per counted example, train and test together.
    """

    def __init__(self, histograms: Sequence[Mapping[str, Sequence[int]]], label_names: Sequence[str]) -> None:
        super().__init__()
        self._features = datasets.Features({LABEL: datasets.ClassLabel(names=list(label_names))})
        counts = [[sum(col) for col in zip(*h.values(), strict=True)] for h in histograms]
        self._rows = [[label for label, n in enumerate(c) for _ in range(n)] for c in counts]
        self.dataset = self._labels([row for rows in self._rows for row in rows])  # plots read its features

    def _labels(self, rows: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({LABEL: rows}, features=self._features)

    @property
    def num_partitions(self) -> int:
        return len(self._rows)

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        return self._labels(self._rows[partition_id])


def label_distributions(
    histograms: Sequence[Mapping[str, Sequence[int]]], label_names: Sequence[str], path: Path
) -> None:
    """flwr-datasets' ``plot_label_distributions``: examples per label and client (train + test).

    At most ``MAX_PLOTTED_CLIENTS`` clients, the first ones (the title says so when it cuts).
    """
    from flwr_datasets.visualization import plot_label_distributions

    shown = histograms[:MAX_PLOTTED_CLIENTS]
    partitioner = HistogramPartitioner(shown, label_names)
    title = "examples per label and client"
    if len(shown) < len(histograms):
        title += f" (clients 0-{len(shown) - 1} of {len(histograms)})"
    fig, _, _ = plot_label_distributions(
        partitioner, label_name=LABEL, plot_type="bar", size_unit="absolute", legend=True,
        legend_title="label", title=title,
    )  # fmt: skip
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
