"""The sweep report's text: ``report.md`` (results with marks, prior, cost, rank, problems) and ``report.csv``."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from pf2lora_core.analysis.grouping import Group, metric_label, prior_values, setting_of, values_of
from pf2lora_core.analysis.loading import (
    ALGORITHM_KEY,
    COST_AND_RANK,
    PRIORS,
    QUALITY,
    QUANTITIES,
    Problem,
    Quantity,
    Sweep,
    lower_is_better,
)
from pf2lora_core.analysis.statistics import BEST, SAME, marks
from pf2lora_core.analysis.tables import cell, markdown_table
from pf2lora_core.config.keys import BASELINES, PLOTS_DIR

MARK_TEXT = (
    f"Marks, per column and setting (rows with the same swept values): {BEST} the best row (highest mean; "
    f"lowest for loss / perplexity); {SAME} a row whose difference to that best row lies inside the 95% Welch "
    "t-interval of the difference, so these seeds cannot tell the two apart. Rows with one seed are not marked."
)


def column_marks(groups: Sequence[Group], name: str) -> dict[int, str]:
    """Per group index: ``BEST``, ``SAME`` or nothing in column ``name``, per setting (see ``MARK_TEXT``)."""
    settings: dict[tuple[str | None, ...], list[int]] = {}
    for i, g in enumerate(groups):
        settings.setdefault(setting_of(g), []).append(i)
    out: dict[int, str] = {}
    for members in settings.values():
        # the direction of the first row with a value decides (one metric per sweep in practice)
        first = next((i for i in members if math.isfinite(groups[i].stats[name].mean)), members[0])
        lower = lower_is_better(metric_label([groups[first]]))
        out |= marks({i: values_of(groups[i], name) for i in members}, lower)
    return out


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
        f"{len(incomplete)} incomplete. Metric: {metric_label(groups) or '-'}. Results: mean ± standard error "
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


def _md_problems(title: str, problems: Sequence[Problem]) -> list[str]:
    lines = [f"## {title}", ""]
    if not problems:
        return [*lines, "None.", ""]
    for p in problems:
        overrides = " ".join(f"{k}={v}" for k, v in (p.overrides or {}).items()) or "(overrides unknown)"
        lines.append(f"- `{p.job}`: `{overrides}`: {p.reason}")
    return [*lines, ""]
