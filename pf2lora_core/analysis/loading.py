"""Reading a sweep directory: its jobs, each finished run's numbers, and which override keys vary.

A sweep directory holds one directory per job: ``job.json`` (``{"overrides": ["key=value", ...],
"status": "done" | "failed" | "skipped"}``) and, once the job finished, the run-directory files
(``summary.json``, ``metrics.jsonl``, ``config.yaml``); a failed job holds ``failed.json``
(``{"overrides", "error", "log_tail"}``) instead. Directories without ``job.json`` (``plots/``
among them) and names starting with ``.`` are not jobs. A job that runs several seeds
(``sweep.seeds``: a tuning trial) holds one such directory per seed, ``<job>/seed=<s>/``; each is
read as a job of its own. ``QUANTITIES`` names the per-run numbers read from each ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pf2lora_core.config.keys import (
    FAILED_FILE,
    FLOPS_PER_CLIENT_ROUND,
    FLOPS_PER_STEP,
    JOB_FILE,
    LOWER_IS_BETTER,
    METRICS_FILE,
    PERSONALIZED,
    SUMMARY_FILE,
    VALIDATION,
)
from pf2lora_core.run.records import Cost, RecordError, Summary, read_metrics

# Override keys that never form a group of their own: the algorithm is a group's name, and the
# seeds of a group are what its mean and standard deviation are taken over.
ALGORITHM_KEY = "algorithm"


SEED_KEY = "seed"


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
        summary = with_round_flops(Summary.read(path / SUMMARY_FILE), path / "config.yaml")
        return run_from_summary(name, overrides, summary, read_round_curve(path / METRICS_FILE))
    except RecordError as e:
        return Problem(name, overrides, f"{SUMMARY_FILE} malformed ({e})", failed=False)


def run_from_summary(job: str, overrides: dict[str, str], summary: Summary, rounds: dict[int, float]) -> Run:
    """What the report reads of one run's ``summary.json``."""
    metric = summary.metric
    return Run(
        job=job,
        overrides=overrides,
        algorithm=summary.algorithm,
        metric=metric,
        values=_run_values(summary),
        clients={c.client: c.value(PERSONALIZED, metric) for c in summary.clients},
        spectra={c.client: s for c in summary.clients if (s := c.rank.mean_spectrum())},
        rounds=rounds,
    )


def with_round_flops(summary: Summary, config_path: Path) -> Summary:
    """``cost.flops_per_round`` filled in where the summary lacks it: FLOPs of one client's round
    (``flops_per_client_round``, else ``flops_per_local_step`` x ``local_steps``) x clients trained
    per round (``ceil(num_clients x fraction_train)``), read from the run's config."""
    cost = summary.cost
    per_client, per_step = cost.get(FLOPS_PER_CLIENT_ROUND), cost.get(FLOPS_PER_STEP)
    if cost.get("flops_per_round") is not None or not config_path.is_file():
        return summary
    if per_client is None and per_step is None:
        return summary
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(config_path)
        fed = cfg.get("federation") or {}
        clients = math.ceil(int(fed["num_clients"]) * float(fed.get("fraction_train", 1.0)))
        client_round = float(per_client) if per_client is not None else float(per_step) * int(cfg["local_steps"])
    except (KeyError, TypeError, ValueError, OSError):
        return summary  # a config without these keys: the report shows no FLOPs per round
    return dataclasses.replace(summary, cost=Cost({**cost.values, "flops_per_round": client_round * clients}))


def validation_mean(summary: Summary) -> float:
    """The number anything is chosen on: ``validation.mean`` of a ``summary.json``.

    That is the mean over clients of the personalized validation metric (the global one for
    methods without personalization). Raises ``ValueError`` saying what is missing.
    """
    block = summary.validation
    if block is None or not math.isfinite(block.mean):
        raise ValueError(
            f"{SUMMARY_FILE} has no '{VALIDATION}.mean': the run has no per-client validation split "
            "(task.val_fraction > 0, written since issue 12); tuning chooses on validation only"
        )
    return block.mean


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def _run_values(summary: Summary) -> dict[str, float]:
    pers, comm, cost = summary.personalized, summary.communication, summary.cost
    baselines = summary.baselines or {}
    return {
        "validation": summary.validation.mean if summary.validation else math.nan,
        "personalized": pers.mean,
        "personalized_weighted": pers.weighted_mean,
        "personalized_worst": pers.worst,
        "personalized_balanced": pers.balanced.mean if pers.balanced else math.nan,
        "global": summary.global_.mean,
        "params_common": float(comm.params_common),
        "params_private": float(comm.params_private),
        "bytes_up_per_round": comm.bytes_up_per_round,
        "bytes_down_per_round": comm.bytes_down_per_round,
        **{k: _num(cost.get(k)) for k in ("seconds_per_round", FLOPS_PER_STEP)},
        **{k: _num(cost.get(k)) for k in ("examples_per_round", "gradient_passes_per_round", "flops_per_round")},
        **_rank_spread([c.rank.effective for c in summary.clients if math.isfinite(c.rank.effective)]),
        **{q.name: baselines[q.name].mean if q.name in baselines else math.nan for q in PRIORS},
    }


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


def read_round_curve(path: Path) -> dict[int, float]:
    """Round -> personalized mean from ``metrics.jsonl``; rounds without evaluation are absent.

    A malformed file gives no curve (the report still has the run's summary)."""
    try:
        records = read_metrics(path)
    except RecordError:
        return {}
    return {r.round: r.kinds[PERSONALIZED].mean for r in records if r.evaluated}


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
