"""Cross-run report of a sweep directory: ``report.md``, ``report.csv`` and plots (matplotlib, Agg).

A sweep directory holds one directory per job: ``job.json`` (``{"overrides": ["key=value", ...],
"status": "done" | "failed" | "skipped"}``) and, once the job finished, the run-directory files
(``summary.json``, ``metrics.jsonl``, ``config.yaml``); a failed job holds ``failed.json``
(``{"overrides", "error", "log_tail"}``) instead. Directories without ``job.json`` (``plots/``
among them) and names starting with ``.`` are not jobs.

A job that runs several seeds (``sweep.seeds``: a tuning trial) holds one such directory per
seed, ``<job>/seed=<s>/``; each is read as a job of its own.

Override keys whose value differs between jobs are *swept*; the others are the fixed setting.
Finished runs are grouped by algorithm (read from ``summary.json``) and the values of the swept
keys other than ``algorithm`` and ``seed``. Per group and quantity of ``QUANTITIES`` the report
gives the mean over the group's seeds and the sample standard deviation (``ddof=1``; none for a
single seed); seeds where a quantity is missing (``null``/NaN) are left out of it. For the
result quantities (``QUALITY``) it also gives the standard error ``std / sqrt(n)`` and the 95%
t-interval ``mean ± t_{0.975, n-1} se``, and marks every row whose difference to the best row of
its setting is inside the 95% Welch interval of that difference (``≈``: not distinguishable
with these seeds). The label prior (``baselines`` of ``summary.json``) is given as rows of its own.

``report.csv`` columns: ``algorithm``, the swept keys, ``n_seeds``, then ``<quantity>_mean`` and
``<quantity>_std`` per quantity, then ``<quantity>_se``, ``<quantity>_ci95_low`` and
``<quantity>_ci95_high`` per result quantity; missing values are empty cells.

Usage: ``pf2lora-report DIR [--x KEY] [--at VALUE]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

from pf2lora_core.analysis.statistics import BEST, SAME, Summary, marks, summarize
from pf2lora_core.analysis.tables import cell, markdown_table
from pf2lora_core.constants import (
    BASELINES,
    FAILED_FILE,
    FLOPS_PER_STEP,
    GLOBAL,
    JOB_FILE,
    LOWER_IS_BETTER,
    METRICS_FILE,
    PERSONALIZED,
    PLOTS_DIR,
    REPORT_CSV,
    REPORT_MD,
    SUMMARY_FILE,
    VALIDATION,
)

# Override keys that never form a group of their own: the algorithm is a group's name, and the
# seeds of a group are what its mean and standard deviation are taken over.
ALGORITHM_KEY = "algorithm"
SEED_KEY = "seed"
# The heterogeneity knob of the s-split partition: the natural x axis of the paper's figures.
DEFAULT_X_KEY = "partition.s"
# Errors a hand-edited or half-written JSON file raises while its fields are read.
_BAD_JSON = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


class ReportError(ValueError):
    """Bad input to the report; the message says what to fix."""


@dataclass(frozen=True)
class Quantity:
    """One per-run number reported as mean ± std over seeds."""

    name: str  # CSV stem: columns ``<name>_mean`` and ``<name>_std``
    label: str  # report.md column header
    fmt: str  # format spec in report.md


QUALITY = (
    # chosen on: the mean personalized validation metric (global for methods without personalization)
    Quantity("validation", "validation mean", ".3f"),
    Quantity("personalized", "personalized mean", ".3f"),
    Quantity("personalized_weighted", "personalized weighted mean", ".3f"),
    Quantity("personalized_worst", "personalized worst", ".3f"),
    # mean per-class recall (classification): learning only the label prior shows here as 1 / classes
    Quantity("personalized_balanced", "personalized balanced acc.", ".3f"),
    Quantity("global", "global mean", ".3f"),
)
COST_AND_RANK = (
    Quantity("params_common", "params common", ",.0f"),
    Quantity("params_private", "params private", ",.0f"),
    Quantity("bytes_up_per_round", "bytes up / round", ",.0f"),
    Quantity("bytes_down_per_round", "bytes down / round", ",.0f"),
    Quantity("seconds_per_round", "s / round", ".2f"),
    Quantity(FLOPS_PER_STEP, "FLOPs / local step", ".3g"),
    # What a round consumed, over all clients (summary ``cost``); FLOPs / round is FLOPs per local
    # step x local steps x clients trained per round (config.yaml) unless the summary gives it.
    Quantity("examples_per_round", "examples / round", ",.0f"),
    Quantity("gradient_passes_per_round", "gradient passes / round", ",.0f"),
    Quantity("flops_per_round", "FLOPs / round", ".3g"),
    # Learned rank across a run's clients (``rank.effective``: mean threshold rank over modules).
    Quantity("rank", "eff. rank: client mean", ".2f"),
    Quantity("rank_client_std", "eff. rank: client std", ".2f"),
    Quantity("rank_min", "eff. rank: min", ".2f"),
    Quantity("rank_max", "eff. rank: max", ".2f"),
)
# The label prior (summary ``baselines``): each client's majority label on its own test split,
# and the global majority label, as accuracies. Read by the prior rows, not the algorithm rows.
PRIORS = (
    Quantity("client_majority", "client majority", ".3f"),
    Quantity("global_majority", "global majority", ".3f"),
)
QUANTITIES = QUALITY + COST_AND_RANK + PRIORS


@dataclass(frozen=True)
class Run:
    """What the report needs of one finished job."""

    job: str
    overrides: dict[str, str]
    algorithm: str
    metric: str
    values: dict[str, float]  # Quantity.name -> value (NaN when absent)
    clients: dict[int, float]  # client -> personalized metric
    spectra: dict[int, list[float]]  # client -> singular values averaged over modules
    rounds: dict[int, float]  # round -> personalized mean (metrics.jsonl)


@dataclass(frozen=True)
class Problem:
    """A job without a usable result."""

    job: str
    overrides: dict[str, str] | None  # None when job.json itself is unreadable
    reason: str
    failed: bool  # True: the job failed; False: it is incomplete or its files are malformed


@dataclass(frozen=True)
class Sweep:
    """The jobs of a sweep directory, read, and which override keys vary between them."""

    path: Path
    runs: list[Run]
    problems: list[Problem]
    swept: list[str]
    setting: dict[str, str]

    @property
    def group_keys(self) -> list[str]:
        return [k for k in self.swept if k not in (ALGORITHM_KEY, SEED_KEY)]


@dataclass(frozen=True)
class Group:
    """The runs of one algorithm at one point of the sweep, one per seed."""

    algorithm: str
    values: dict[str, str | None]  # group key -> override value
    runs: list[Run]
    stats: dict[str, Summary]  # Quantity.name -> its summary over seeds (mean, std, se, interval)

    def label(self, leave_out: str | None = None) -> str:
        """Algorithm plus the group values except ``leave_out`` (the plot's x axis)."""
        rest = [f"{k}={v}" for k, v in self.values.items() if k != leave_out]
        return " ".join([self.algorithm, *rest])

    def x(self, key: str) -> float:
        return float(self.values[key] or "nan")


# ---------------------------------------------------------------------------------------- loading


def parse_overrides(items: Any) -> dict[str, str]:
    """``["a=1", "+b.c=x"]`` -> ``{"a": "1", "b.c": "x"}``; Hydra's ``+``/``++``/``~`` prefixes dropped."""
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise TypeError("'overrides' must be a list of 'key=value' strings")
    out = {}
    for item in items:
        key, _, value = item.lstrip("+~").partition("=")
        out[key.strip()] = value.strip()
    return out


def load_sweep(sweep_dir: Path) -> Sweep:
    """Every job directory of ``sweep_dir``, read; raises ``ReportError`` when there is none."""
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory; pass the sweep directory (one sub-directory per job)")
    jobs = [_load_job(d, sweep_dir) for d in job_dirs(sweep_dir)]
    if not jobs:
        raise ReportError(f"{sweep_dir} holds no job directories (sub-directories with {JOB_FILE})")
    runs = [j for j in jobs if isinstance(j, Run)]
    problems = [j for j in jobs if isinstance(j, Problem)]
    known = [r.overrides for r in runs] + [p.overrides for p in problems if p.overrides is not None]
    swept, setting = split_overrides(known)
    return Sweep(sweep_dir, runs, problems, swept, setting)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories with a ``job.json``: the sweep's children, or a multi-seed job's ``seed=<s>/``."""
    out = []
    for d in sorted(sweep_dir.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if (d / JOB_FILE).is_file():
            out.append(d)
        else:
            out.extend(c for c in sorted(d.iterdir()) if c.is_dir() and (c / JOB_FILE).is_file())
    return out


def split_overrides(jobs: Sequence[Mapping[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Swept keys (value differs between jobs, or missing in some) and the fixed setting."""
    keys = list(dict.fromkeys(k for job in jobs for k in job))
    swept = [k for k in keys if len({job.get(k) for job in jobs}) > 1]
    return swept, {k: jobs[0][k] for k in keys if k not in swept}


def _load_job(path: Path, root: Path) -> Run | Problem:
    name = path.relative_to(root).as_posix()
    try:
        job = json.loads((path / JOB_FILE).read_text(encoding="utf-8"))
        overrides, status = parse_overrides(job["overrides"]), job.get("status")
    except _BAD_JSON as e:
        return Problem(name, None, f"{JOB_FILE} unreadable ({type(e).__name__}: {e})", failed=False)
    # A summary wins over a stale failed.json of an earlier attempt, unless the job says it failed.
    if (path / SUMMARY_FILE).is_file() and status != "failed":
        return _load_run(path, name, overrides)
    if status == "failed" or (path / FAILED_FILE).is_file():
        return Problem(name, overrides, _failure_reason(path), failed=True)
    return Problem(name, overrides, f"no {SUMMARY_FILE} or {FAILED_FILE} (status: {status})", failed=False)


def _failure_reason(path: Path) -> str:
    try:
        error = json.loads((path / FAILED_FILE).read_text(encoding="utf-8"))["error"]
    except FileNotFoundError:
        return f"status 'failed' but no {FAILED_FILE}"
    except _BAD_JSON as e:
        return f"{FAILED_FILE} unreadable ({type(e).__name__}: {e})"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no error message)"


def _load_run(path: Path, name: str, overrides: dict[str, str]) -> Run | Problem:
    # One malformed summary must not take the whole report down: it is listed as incomplete.
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
        summary = _with_round_flops(summary, path / "config.yaml")
        return run_from_summary(name, overrides, summary, read_round_curve(path / METRICS_FILE))
    except _BAD_JSON as e:
        return Problem(name, overrides, f"{SUMMARY_FILE} malformed ({type(e).__name__}: {e})", failed=False)


def run_from_summary(job: str, overrides: dict[str, str], summary: Mapping[str, Any], rounds: dict[int, float]) -> Run:
    """Read a ``summary.json`` (fields of ``summary.build_summary``); raises on malformed fields."""
    metric = str(summary[PERSONALIZED]["metric"])
    clients = summary.get("clients") or []
    return Run(
        job=job,
        overrides=overrides,
        algorithm=str(summary[ALGORITHM_KEY]),
        metric=metric,
        values=_run_values(summary, _client_ranks(clients)),
        clients={int(c["client"]): _num((c.get(PERSONALIZED) or {}).get(metric)) for c in clients},
        spectra={int(c["client"]): s for c in clients if (s := _module_mean_spectrum(c))},
        rounds=rounds,
    )


def _with_round_flops(summary: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """``cost.flops_per_round`` filled in where the summary lacks it: FLOPs of one client's round
    (``flops_per_client_round``, else ``flops_per_local_step`` x ``local_steps``) x clients trained
    per round (``ceil(num_clients x fraction_train)``), read from the run's config."""
    cost = summary.get("cost") or {}
    per_client = cost.get("flops_per_client_round")
    if cost.get("flops_per_round") is not None or not config_path.is_file():
        return summary
    if per_client is None and cost.get(FLOPS_PER_STEP) is None:
        return summary
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path)
    fed = cfg.get("federation") or {}
    try:
        clients = math.ceil(int(fed["num_clients"]) * float(fed.get("fraction_train", 1.0)))
        client_round = (
            float(per_client) if per_client is not None else float(cost[FLOPS_PER_STEP]) * int(cfg["local_steps"])
        )
        per_round = client_round * clients
    except (KeyError, TypeError, ValueError):
        return summary
    return {**summary, "cost": {**cost, "flops_per_round": per_round}}


def validation_mean(summary: Mapping[str, Any]) -> float:
    """The number anything is chosen on: ``validation.mean`` of a ``summary.json``.

    That is the mean over clients of the personalized validation metric (the global one for
    methods without personalization). Raises ``ValueError`` saying what is missing.
    """
    block = summary.get(VALIDATION)
    if not isinstance(block, Mapping) or block.get("mean") is None:
        raise ValueError(
            f"{SUMMARY_FILE} has no '{VALIDATION}.mean': the run has no per-client validation split "
            "(task.val_fraction > 0, written since issue 12); tuning chooses on validation only"
        )
    return float(block["mean"])


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def _baseline(summary: Mapping[str, Any], key: str) -> float:
    """A prior accuracy: a number, or a block with ``mean`` / ``accuracy`` (read defensively)."""
    value = (summary.get(BASELINES) or {}).get(key)
    if isinstance(value, Mapping):
        value = value.get("mean", value.get("accuracy"))
    return _num(value)


def _run_values(summary: Mapping[str, Any], ranks: list[float]) -> dict[str, float]:
    pers, glob = summary[PERSONALIZED], summary.get(GLOBAL) or {}
    comm, cost = summary.get("communication") or {}, summary.get("cost") or {}
    val = summary.get(VALIDATION) or {}
    return {
        "validation": _num(val.get("mean")) if isinstance(val, Mapping) else math.nan,
        "personalized": _num(pers.get("mean")),
        "personalized_weighted": _num(pers.get("weighted_mean")),
        "personalized_worst": _num(pers.get("worst")),
        "personalized_balanced": _num((pers.get("balanced_accuracy") or {}).get("mean")),
        "global": _num(glob.get("mean")),
        **{k: _num(comm.get(k)) for k in ("params_common", "params_private")},
        **{k: _num(comm.get(k)) for k in ("bytes_up_per_round", "bytes_down_per_round")},
        **{k: _num(cost.get(k)) for k in ("seconds_per_round", FLOPS_PER_STEP)},
        **{k: _num(cost.get(k)) for k in ("examples_per_round", "gradient_passes_per_round", "flops_per_round")},
        **_rank_spread(ranks),
        **{q.name: _baseline(summary, q.name) for q in PRIORS},
    }


def _client_ranks(clients: Sequence[Mapping[str, Any]]) -> list[float]:
    ranks = [(c.get("rank") or {}).get("effective") for c in clients]
    return [float(r) for r in ranks if r is not None]


def _rank_spread(ranks: Sequence[float]) -> dict[str, float]:
    """Spread of the learned rank across clients (population std: the clients are all there is)."""
    if not ranks:
        return dict.fromkeys(("rank", "rank_client_std", "rank_min", "rank_max"), math.nan)
    return {
        "rank": statistics.fmean(ranks),
        "rank_client_std": statistics.pstdev(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
    }


def _module_mean_spectrum(client: Mapping[str, Any]) -> list[float]:
    """Singular values averaged over modules, index by index (up to the shortest module's)."""
    modules = ((client.get("rank") or {}).get("modules") or {}).values()
    spectra = [[float(s) for s in m["singular_values"]] for m in modules if m.get("singular_values")]
    # strict=False: modules may keep different numbers of singular values; the common prefix is averaged.
    return [statistics.fmean(col) for col in zip(*spectra, strict=False)] if spectra else []


def read_round_curve(path: Path) -> dict[int, float]:
    """Round -> personalized mean from ``metrics.jsonl``; rounds without evaluation are absent."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            out[int(record["round"])] = _num(record[PERSONALIZED]["mean"])
        except _BAD_JSON:
            continue  # a record without evaluation, or a last line cut off by a killed run
    return out


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


# --------------------------------------------------------------------------------------- grouping


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """Runs grouped by algorithm and the values of ``keys``, in sorted order (numbers as numbers)."""
    buckets: dict[tuple[str | None, ...], list[Run]] = {}
    for run in runs:
        buckets.setdefault((run.algorithm, *(run.overrides.get(k) for k in keys)), []).append(run)
    return [
        Group(str(key[0]), dict(zip(keys, key[1:], strict=True)), rs, _stats(rs))
        for key, rs in sorted(buckets.items(), key=lambda kv: [_sort_key(v) for v in kv[0]])
    ]


def _stats(runs: Sequence[Run]) -> dict[str, Summary]:
    return {q.name: summarize(r.values[q.name] for r in runs) for q in QUANTITIES}


def _sort_key(value: str | None) -> tuple[int, float, str]:
    if value is None:
        return (2, 0.0, "")
    number = _as_float(value)
    return (1, 0.0, value) if number is None else (0, number, value)


def _as_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def resolve_x(sweep: Sweep, x_key: str | None) -> str | None:
    """The x-axis key: ``x_key`` checked, else ``partition.s`` if swept, else the first numeric key."""
    numeric = [k for k in sweep.group_keys if _is_numeric(k, sweep.runs)]
    if x_key is None:
        return DEFAULT_X_KEY if DEFAULT_X_KEY in numeric else next(iter(numeric), None)
    if x_key not in sweep.group_keys:
        usable = ", ".join(sweep.group_keys) or "none"
        raise ReportError(f"--x {x_key!r} is not a swept key; swept keys (other than algorithm, seed): {usable}")
    if x_key not in numeric:
        raise ReportError(f"--x {x_key!r} has non-numeric values; numeric swept keys: {', '.join(numeric) or 'none'}")
    return x_key


def _is_numeric(key: str, runs: Sequence[Run]) -> bool:
    return bool(runs) and all(_as_float(r.overrides.get(key)) is not None for r in runs)


def resolve_at(groups: Sequence[Group], x_key: str | None, at: str | None) -> float | None:
    """The x value of the per-client, per-round and spectrum plots: ``at`` checked, else the largest."""
    if x_key is None:
        if at is not None:
            raise ReportError("--at needs an x axis, but no numeric key was swept")
        return None
    xs = sorted({g.x(x_key) for g in groups})
    if at is None:
        return xs[-1] if xs else None
    wanted = _as_float(at)
    match = [x for x in xs if wanted is not None and math.isclose(x, wanted, rel_tol=1e-9)]
    if not match:
        raise ReportError(f"--at {at!r} is not a value of {x_key}; values: {', '.join(_fmt_x(x) for x in xs)}")
    return match[0]


def _fmt_x(value: float) -> str:
    return f"{value:g}"


# ------------------------------------------------------------------------------------------ plots


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
    suffix = "" if x_key is None or at is None else f"_at_{_safe_key(x_key)}_{_safe_value(_fmt_x(at))}"
    for stem, plot in (("clients", plot_clients), ("rounds", plot_rounds), ("rank_spectra", plot_rank_spectra)):
        written.append(_maybe(plot, at_groups, x_key, colors, folder / f"{stem}{suffix}.png"))
    return [p for p in written if p is not None]


def _maybe(plot: Any, groups: Sequence[Group], x_key: str | None, colors: Mapping[str, str], path: Path) -> Path | None:
    return path if groups and plot(groups, x_key, colors, path) else None


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)


def _safe_value(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value)


def _metric(groups: Sequence[Group]) -> str:
    return " / ".join(dict.fromkeys(r.metric for g in groups for r in g.runs))


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
        ax.set(xlabel=x_key, ylabel=_metric(groups), title=title)
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
    ax.set(xlabel="client", ylabel=_metric(groups), title=f"per-client personalized {_metric(groups)}")
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
    ax.set(xlabel="round", ylabel=f"personalized mean {_metric(groups)}", title="evaluation per round")
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


# ---------------------------------------------------------------------------------------- writing


def values_of(group: Group, name: str) -> list[float]:
    """One quantity of every run of the group (one per seed), NaN where missing."""
    return [r.values[name] for r in group.runs]


def write_csv(groups: Sequence[Group], keys: Sequence[str], path: Path) -> None:
    """One row per group; NaN and missing values as empty cells."""
    stat_cols = [f"{q.name}_{s}" for q in QUANTITIES for s in ("mean", "std")]
    unc_cols = [f"{q.name}_{s}" for q in QUALITY for s in ("se", "ci95_low", "ci95_high")]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([ALGORITHM_KEY, *keys, "n_seeds", *stat_cols, *unc_cols])
        for g in groups:
            s = g.stats
            stats = [_csv_num(v) for q in QUANTITIES for v in (s[q.name].mean, s[q.name].std)]
            unc = [_csv_num(v) for q in QUALITY for v in (s[q.name].se, s[q.name].low, s[q.name].high)]
            writer.writerow([g.algorithm, *(g.values[k] or "" for k in keys), len(g.runs), *stats, *unc])


def _csv_num(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


def render_markdown(sweep: Sweep, groups: Sequence[Group], plots: Sequence[Path]) -> str:
    failed = [p for p in sweep.problems if p.failed]
    incomplete = [p for p in sweep.problems if not p.failed]
    lines = [
        f"# Sweep report: {sweep.path.name}",
        "",
        f"{len(sweep.runs) + len(sweep.problems)} jobs: {len(sweep.runs)} finished, {len(failed)} failed, "
        f"{len(incomplete)} incomplete. Metric: {_metric(groups) or '-'}. Results: mean ± standard error "
        "over seeds [95% t-interval] (no ± for a single seed; the sample std is in report.csv); validation "
        "is the mean personalized validation metric (global for methods without personalization), the "
        "other columns are the test split. Cost: mean ± sample std over seeds.",
        "",
        MARK_TEXT,
        "",
        "## Setting",
        "",
        *([f"- `{k}={v}`" for k, v in sweep.setting.items()] or ["- (no override shared by all jobs)"]),
        f"- swept: {', '.join(f'`{k}`' for k in sweep.swept) or 'nothing'}",
        "",
        "## Results",
        "",
        *_md_results(groups, sweep.group_keys),
        "",
        "## Label prior (test split)",
        "",
        *_md_priors(groups, sweep.group_keys),
        "",
        "## Cost and learned rank",
        "",
        *_md_table(groups, sweep.group_keys, COST_AND_RANK, with_n=False),
        "",
        "## Plots",
        "",
        *([f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots] or ["No plot: no data to draw."]),
        "",
        *_md_problems("Failed jobs", failed),
        *_md_problems("Incomplete jobs", incomplete),
    ]
    return "\n".join(lines)


def _md_table(groups: Sequence[Group], keys: Sequence[str], quantities: Sequence[Quantity], with_n: bool) -> list[str]:
    if not groups:
        return ["No finished job."]
    head = [ALGORITHM_KEY, *keys, *(q.label for q in quantities), *(["n"] if with_n else [])]
    rows = []
    for g in groups:
        cells = [cell(values_of(g, q.name), q.fmt, std=True, se=False) for q in quantities]
        n = [str(len(g.runs))] if with_n else []
        rows.append([g.algorithm, *(g.values[k] or "-" for k in keys), *cells, *n])
    return markdown_table(head, rows)


MARK_TEXT = (
    f"Marks, per column and setting (rows with the same swept values): {BEST} the best row (highest mean; "
    f"lowest for loss / perplexity); {SAME} a row whose difference to that best row lies inside the 95% Welch "
    "t-interval of the difference, so these seeds cannot tell the two apart. Rows with one seed are not marked."
)


def setting_of(group: Group) -> tuple[str | None, ...]:
    return tuple(group.values.values())


def column_marks(groups: Sequence[Group], name: str) -> dict[int, str]:
    """Per group index: ``BEST``, ``SAME`` or nothing in column ``name``, per setting (see ``MARK_TEXT``)."""
    settings: dict[tuple[str | None, ...], list[int]] = {}
    for i, g in enumerate(groups):
        settings.setdefault(setting_of(g), []).append(i)
    out: dict[int, str] = {}
    for members in settings.values():
        # the direction of the first row with a value decides (one metric per sweep in practice)
        first = next((i for i in members if math.isfinite(groups[i].stats[name].mean)), members[0])
        lower = lower_is_better(_metric([groups[first]]))
        out |= marks({i: values_of(groups[i], name) for i in members}, lower)
    return out


def _md_results(groups: Sequence[Group], keys: Sequence[str]) -> list[str]:
    if not groups:
        return ["No finished job."]
    head = [ALGORITHM_KEY, *keys, *(q.label for q in QUALITY), "n"]
    marked = {q.name: column_marks(groups, q.name) for q in QUALITY}
    rows = []
    for i, g in enumerate(groups):
        cells = [cell(values_of(g, q.name), q.fmt, marked[q.name].get(i, ""), interval=True) for q in QUALITY]
        rows.append([g.algorithm, *(g.values[k] or "-" for k in keys), *cells, str(len(g.runs))])
    return markdown_table(head, rows)


def prior_values(groups: Sequence[Group], name: str) -> list[float]:
    """A prior per seed of these groups (one split per seed: the algorithms share it)."""
    by_seed: dict[str, float] = {}
    for g in groups:
        for r in g.runs:
            if math.isfinite(r.values[name]):
                by_seed.setdefault(r.overrides.get(SEED_KEY, r.job), r.values[name])
    return list(by_seed.values())


def _md_priors(groups: Sequence[Group], keys: Sequence[str]) -> list[str]:
    settings: dict[tuple[str | None, ...], list[Group]] = {}
    for g in groups:
        settings.setdefault(setting_of(g), []).append(g)
    rows = []
    for setting, gs in settings.items():
        cells = [cell(prior_values(gs, q.name), q.fmt, interval=True) for q in PRIORS]
        if all(c == "-" for c in cells):
            continue
        n = max(len(prior_values(gs, q.name)) for q in PRIORS)
        rows.append([*(v or "-" for v in setting), *cells, str(n)])
    if not rows:
        return [f"No run reports its label prior (summary.json '{BASELINES}')."]
    return markdown_table([*keys, *(q.label for q in PRIORS), "n"], rows)


def _md_problems(title: str, problems: Sequence[Problem]) -> list[str]:
    lines = [f"## {title}", ""]
    if not problems:
        return [*lines, "None.", ""]
    for p in problems:
        overrides = " ".join(f"{k}={v}" for k, v in (p.overrides or {}).items()) or "(overrides unknown)"
        lines.append(f"- `{p.job}`: `{overrides}`: {p.reason}")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------ entry


def build_report(sweep_dir: Path, x_key: str | None = None, at: str | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and ``plots/*.png`` into ``sweep_dir``; returns report.md.

    Parameters
    ----------
    sweep_dir
        Directory with one sub-directory per job (see the module docstring).
    x_key
        Numeric swept key of the x axis; default ``partition.s`` if swept, else the first numeric one.
    at
        Value of ``x_key`` for the per-client, per-round and spectrum plots; default the largest.
    """
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    groups = group_runs(sweep.runs, sweep.group_keys)
    x = resolve_x(sweep, x_key)
    at_value = resolve_at(groups, x, at)  # checked before anything is written
    plots = write_plots(groups, x, at_value, sweep_dir / PLOTS_DIR)
    write_csv(groups, sweep.group_keys, sweep_dir / REPORT_CSV)
    report = sweep_dir / REPORT_MD
    report.write_text(render_markdown(sweep, groups, plots), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pf2lora-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="sweep directory: one sub-directory per job")
    parser.add_argument("--x", dest="x_key", help="numeric swept key for the x axis (default: partition.s)")
    parser.add_argument("--at", help="x value for the per-client, per-round and spectrum plots (default: largest)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.sweep_dir, args.x_key, args.at)
    except ReportError as e:
        print(f"pf2lora-report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
