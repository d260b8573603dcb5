"""The sweep report's plots (matplotlib, Agg): metric and learned rank vs x, per client, per round, spectra."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from pf2lora_core.analysis.grouping import Group, fmt_x, metric_label
from pf2lora_core.analysis.statistics import summarize


def write_plots(groups: Sequence[Group], x_key: str | None, at: float | None, folder: Path) -> list[Path]:
    """Every plot whose data is there; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    # One colour per line label in every plot, so an algorithm looks the same throughout the report.
    colors = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(g.label(x_key) for g in groups))}
    written = []
    if x_key is not None:
        x_name = _safe_key(x_key)
        written.append(_maybe(plot_metric_vs_x, groups, x_key, colors, folder / f"metric_vs_{x_name}.png"))
        written.append(_maybe(plot_rank_spread_vs_x, groups, x_key, colors, folder / f"rank_spread_vs_{x_name}.png"))
    at_groups = [g for g in groups if x_key is None or g.x(x_key) == at]
    suffix = "" if x_key is None or at is None else f"_at_{_safe_key(x_key)}_{_safe_value(fmt_x(at))}"
    for stem, plot in (("clients", plot_clients), ("rounds", plot_rounds), ("rank_spectra", plot_rank_spectra)):
        written.append(_maybe(plot, at_groups, x_key, colors, folder / f"{stem}{suffix}.png"))
    return [p for p in written if p is not None]


def _maybe(plot: Any, groups: Sequence[Group], x_key: str | None, colors: Mapping[str, str], path: Path) -> Path | None:
    return path if groups and plot(groups, x_key, colors, path) else None


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)


def _safe_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value)


def _series(groups: Sequence[Group], x_key: str) -> dict[str, list[Group]]:
    """Groups that differ only in ``x_key``, one line each, sorted by x."""
    out: dict[str, list[Group]] = {}
    for g in groups:
        out.setdefault(g.label(x_key), []).append(g)
    return {label: sorted(gs, key=lambda g: g.x(x_key)) for label, gs in out.items()}


def _save(fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_metric_vs_x(groups: Sequence[Group], x_key: str, colors: Mapping[str, str], path: Path) -> bool:
    """Personalized mean, personalized worst and global mean vs x; error bars: std over seeds."""
    panels = (
        ("personalized", "personalized mean"),
        ("personalized_worst", "personalized worst"),
        ("global", "global mean"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4), sharex=True)
    for ax, (name, title) in zip(axes, panels, strict=True):
        for label, gs in _series(groups, x_key).items():
            means = [g.stats[name].mean for g in gs]
            yerr = [0.0 if math.isnan(g.stats[name].std) else g.stats[name].std for g in gs]
            ax.errorbar(
                [g.x(x_key) for g in gs], means, yerr=yerr, marker="o", capsize=3, label=label, color=colors[label]
            )
        ax.set(xlabel=x_key, ylabel=metric_label(groups), title=title)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_rank_spread_vs_x(groups: Sequence[Group], x_key: str, colors: Mapping[str, str], path: Path) -> bool:
    """Mean effective rank across clients vs x, band from the clients' min to max (seed means)."""
    series = {k: gs for k, gs in _series(groups, x_key).items() if any(math.isfinite(g.stats["rank"].mean) for g in gs)}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, gs in series.items():
        xs = [g.x(x_key) for g in gs]
        ax.plot(xs, [g.stats["rank"].mean for g in gs], marker="o", label=label, color=colors[label])
        lo, hi = [g.stats["rank_min"].mean for g in gs], [g.stats["rank_max"].mean for g in gs]
        ax.fill_between(xs, lo, hi, color=colors[label], alpha=0.2)
    ax.set(xlabel=x_key, ylabel="effective rank", title="learned rank across clients (band: min-max)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_clients(groups: Sequence[Group], x_key: str | None, colors: Mapping[str, str], path: Path) -> bool:
    """Per-client personalized metric (mean over seeds), bars grouped by algorithm."""
    bars = {g.label(x_key): c for g in groups if (c := _client_means(g))}
    if not bars:
        return False
    clients = sorted(set().union(*bars.values()))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(clients) * len(bars) + 2), 4))
    for i, (label, values) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(clients))]
        ax.bar(xs, [values.get(c, math.nan) for c in clients], width, label=label, color=colors[label])
    ax.set_xticks(range(len(clients)), [str(c) for c in clients])
    ax.set(xlabel="client", ylabel=metric_label(groups), title=f"per-client personalized {metric_label(groups)}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _client_means(group: Group) -> dict[int, float]:
    clients = sorted({c for r in group.runs for c in r.clients})
    means = {c: summarize(r.clients.get(c, math.nan) for r in group.runs).mean for c in clients}
    return {c: m for c, m in means.items() if math.isfinite(m)}


def plot_rounds(groups: Sequence[Group], x_key: str | None, colors: Mapping[str, str], path: Path) -> bool:
    """Per-round personalized mean (metrics.jsonl), averaged over the seeds at rounds all of them have."""
    curves = {g.label(x_key): c for g in groups if (c := _round_means(g))}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=label, color=colors[label])
    ax.set(xlabel="round", ylabel=f"personalized mean {metric_label(groups)}", title="evaluation per round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _round_means(group: Group) -> dict[int, float]:
    curves = [r.rounds for r in group.runs if r.rounds]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return {k: m for k in common if math.isfinite(m := summarize(c[k] for c in curves).mean)}


def plot_rank_spectra(groups: Sequence[Group], x_key: str | None, colors: Mapping[str, str], path: Path) -> bool:
    """Per algorithm a panel; per client the module-averaged spectrum over its largest value (log y).

    Lines are clients here, so ``colors`` (per algorithm) is unused; it keeps the plots' shared signature.
    """
    panels = {g.label(x_key): s for g in groups if (s := _client_spectra(g))}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (label, spectra) in zip(axes[0], panels.items(), strict=True):
        for client, sv in spectra.items():
            masked = [s if s > 0 else math.nan for s in sv]  # zeros have no place on a log axis
            ax.semilogy(range(1, len(sv) + 1), masked, marker="o", ms=3, label=f"client {client}")
        ax.set(xlabel="index", ylabel="sigma_i / sigma_1", title=label)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _client_spectra(group: Group) -> dict[int, list[float]]:
    """Each seed's spectrum normalised by its largest value, then averaged over seeds."""
    out = {}
    for client in sorted({c for r in group.runs for c in r.spectra}):
        normed = [[s / max(sv) for s in sv] for r in group.runs if (sv := r.spectra.get(client)) and max(sv) > 0]
        if normed:
            out[client] = [statistics.fmean(col) for col in zip(*normed, strict=False)]  # common prefix
    return out
