"""Regenerates ``results/`` (issue 13, item 4): every algorithm, tuned configurations, 3 seeds.

``python -m benchmarks.results [--stages rt2_s0.5,rt3_s0.5,ablations,...] [--workers 2]`` (``make results``)

What runs: Rotten Tomatoes 2-way (``rt2``) and 3-way (``rt3``: fresh / rotten / plot) at s in
{0.3, 0.5, 0.9}, the algorithms of ``ALGORITHMS`` at the configurations ``pf2lora-tune`` chose on
validation splits (``results/tune_offline_compare/tune.json``; an algorithm it did not tune runs at
its ``conf/algorithm/`` defaults, and the tables say so), and PF2LoRA's ablations at s = 0.5 on both
datasets (``ABLATIONS``). Seeds 0, 1, 2. Nothing is chosen here: test splits are read only to report.

Each run is a ``benchmarks.federated`` run (in process, the same local steps, private state and
evaluation as ``flwr run``). Every finished run is appended to ``results/runs.jsonl`` (shared with
``benchmarks.robustness``), a re-run computes only what is missing, and ``results/README.md``
(tables, plots) is re-rendered from that file after every run; the prose between its ``prose``
markers is kept. ``--render-only`` re-renders without running anything.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.federated import (
    DATASETS,
    ROOT,
    S_VALUES,
    Job,
    RunLog,
    add_run_arguments,
    mean,
    run_all,
    run_arguments,
)
from pf2lora_core.analysis.loading import lower_is_better
from pf2lora_core.analysis.statistics import marks, summarize
from pf2lora_core.analysis.tables import cell, markdown_table

RESULTS = ROOT / "results"
TUNED = RESULTS / "tune_offline_compare" / "tune.json"
# The PF2LoRA configuration of the tables: the exact rule, PF2LoRA's defaults before issue 29 (what
# these runs ran; the shipped defaults sit inside its intervals, results/cost_options). Re-running
# the tables at the shipped defaults is ``PF2LORA = "pf2lora"`` and about 40 minutes of new runs.
PF2LORA = "pf2lora_exact"
PF2LORA_NOTE = {
    "pf2lora_exact": "PF2LoRA's rows (`pf2lora_exact`) ran every bilevel step's exact hypergradient with J = K "
    "re-fit steps and the private step equal to the common one: PF2LoRA's defaults before issue 29. The shipped "
    "default is cheaper (1.98x HOMLoRA's FLOPs a round against 3.57x) and was measured against these rows in "
    "[cost_options/](cost_options/README.md). ",
}
ALGORITHMS = (PF2LORA, "homlora", "hetlora", "fedsa_lora", "feddpa", "perfedavg", "ffa_lora", "local", "centralized")
# Not a federated method (every client's data pooled on one node): shown, never marked best.
REFERENCES = ("centralized",)
SEEDS = (0, 1, 2)
# PF2LoRA's ablations (the paper's, and ours): name -> overrides on top of PF2LoRA's tuned configuration.
ABLATIONS: dict[str, list[str]] = {
    "PF2LoRA (bilevel, r~=2, re-fit)": [],
    "no re-fit (the paper's algorithm)": ["algorithm.refit_steps=0"],
    "mode=joint (no bilevel)": ["algorithm.mode=joint"],
    "hvp=first_order": ["algorithm.hvp=first_order"],
    "r~=1": ["algorithm.private_rank=1", "algorithm.private_alpha=2"],
    "r~=4": ["algorithm.private_rank=4", "algorithm.private_alpha=8"],
}
ABLATION_SETTINGS = ("rt2_s0.5",)
STAGES = (
    "rt2_s0.5",
    "rt3_s0.5",
    "ablations",
    "rt2_s0.3",
    "rt2_s0.9",
    "rt3_s0.3",
    "rt3_s0.9",
)
PROSE_START, PROSE_END = "<!-- prose:start -->", "<!-- prose:end -->"
PRIORS = ("client_majority", "global_majority")


# ------------------------------------------------------------------------------- configurations
def tuned_overrides(path: Path = TUNED) -> dict[str, list[str]]:
    """Per algorithm, the overrides ``pf2lora-tune`` chose (on validation) in ``path``."""
    chosen = json.loads(path.read_text())["algorithms"]
    out = {name: [f"{k}={v}" for k, v in row["chosen"].items()] for name, row in chosen.items()}
    if "pf2lora" in out:  # tuned as PF2LoRA (its lr): the same choice for every PF2LoRA configuration
        out.setdefault(PF2LORA, out["pf2lora"])
    return out


def algorithm_overrides(name: str, tuned: Mapping[str, list[str]]) -> tuple[str, ...]:
    return (f"algorithm={name}", *tuned.get(name, []))


def algorithm_rows(tuned: Mapping[str, list[str]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every algorithm as a table row (no configuration text): what the prior rows read their splits from."""
    return {a: ("", algorithm_overrides(a, tuned)) for a in ALGORITHMS}


def jobs_of(stage: str, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[Job]:
    if stage == "ablations":  # the first row is PF2LoRA's own run of the setting's table
        base = algorithm_overrides(PF2LORA, tuned)
        return [
            Job(s, (*base, *extra), seed) for s in ABLATION_SETTINGS for extra in ABLATIONS.values() for seed in seeds
        ]
    dataset, _, s = stage.partition("_s")
    if dataset not in DATASETS or not s:
        raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    return [Job(stage, algorithm_overrides(name, tuned), seed) for seed in seeds for name in ALGORITHMS]


# --------------------------------------------------------------------------------- the cells
def runs_of(log: RunLog, setting: str, overrides: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    runs = [log.result(Job(setting, tuple(overrides), s)) for s in seeds]
    return [r for r in runs if r is not None]


def per_run(runs: Sequence[dict], field: str, reduce: Callable[[list[float]], float] = mean) -> list[float]:
    """One number per run (seed): ``reduce`` over its clients' values of ``field``."""
    out = []
    for r in runs:
        vals = [float(v) for v in r.get(field) or [] if v is not None and math.isfinite(float(v))]
        out.append(reduce(vals) if vals else math.nan)
    return out


def table_marks(runs: Mapping[str, Sequence[dict]], field: str = "test") -> dict[str, str]:
    """``*`` / ``≈`` (``statistics.marks``) over the rows' per-seed ``field``, in the direction of their metric."""
    metric = next((r["metric"] for rs in runs.values() for r in rs if "metric" in r), "")
    return marks({name: per_run(rs, field) for name, rs in runs.items()}, lower_is_better(metric))


def spread(runs: Sequence[dict], field: str, fmt: str = ".1f") -> str:
    vals = [float(x) for r in runs for x in r.get(field) or [] if x is not None]
    return f"{min(vals):{fmt}}-{max(vals):{fmt}}" if vals else "-"


def prior_rows(runs: Sequence[dict], n_cols: int, label_col: int = 2) -> list[list[str]]:
    """The prior rows of a table: the label in the first column, the prior's cell in ``label_col``."""
    rows = []
    for prior in PRIORS:
        cells = ["-"] * n_cols
        cells[0], cells[label_col] = f"prior: {prior.replace('_', ' ')}", cell(per_run(runs, prior))
        rows.append(cells)
    return rows


# --------------------------------------------------------------------------------- the tables
DETAIL_HEAD = [
    "algorithm",
    "configuration",
    "personalized test",
    "global test",
    "worst client",
    "validation",
    "n",
    "examples / round",
    "FLOPs / round",
    "rank (5%)",
    "entropy rank",
    "private energy",
]


def detail_row(name: str, config: str, runs: Sequence[dict], mark: str) -> list[str]:
    return [
        name,
        config,
        cell(per_run(runs, "test"), mark=mark),
        cell(per_run(runs, "test_global")),
        cell(per_run(runs, "test", min)),
        cell(per_run(runs, "validation")),
        str(len(runs)),
        f"{mean(r['examples_per_round'] for r in runs):,.0f}",
        f"{mean(r['flops_per_round'] for r in runs):.2e}",
        spread(runs, "rank"),
        spread(runs, "entropy_rank"),
        spread(runs, "private_energy", ".2f"),
    ]


Rows = Mapping[str, tuple[str, tuple[str, ...]]]  # row name -> (configuration text, overrides)


def setting_table(log: RunLog, setting: str, rows: Rows, seeds: Sequence[int]) -> list[str]:
    """One row per ``name -> (configuration text, overrides)``, then the prior rows."""
    runs = {name: runs_of(log, setting, o, seeds) for name, (_, o) in rows.items()}
    marked = table_marks({name: r for name, r in runs.items() if name not in REFERENCES})
    lines = []
    for name, (config, _) in rows.items():
        if runs[name]:
            lines.append(detail_row(name, config, runs[name], marked.get(name, "")))
        else:
            lines.append([name, config, "not run yet"])
    lines += prior_rows(prior_runs(log, setting, rows, seeds), len(DETAIL_HEAD))
    return markdown_table(DETAIL_HEAD, lines)


def prior_runs(log: RunLog, setting: str, rows: Rows, seeds: Sequence[int]) -> list[dict]:
    """One run per seed that any row has: the splits (and so the priors) depend on the seed alone."""
    out = []
    for seed in seeds:
        found = (runs_of(log, setting, o, [seed]) for _, o in rows.values())
        run = next((r[0] for r in found if r), None)
        if run is not None:
            out.append(run)
    return out


def config_text(name: str, tuned: Mapping[str, list[str]]) -> str:
    if name not in tuned:
        return "defaults (not tuned)"
    return " ".join(f"`{o.split('=')[0].split('.', 1)[-1]}={float(o.split('=')[1]):.3g}`" for o in tuned[name])


def settings() -> list[str]:
    return [f"{d}_s{s}" for d in DATASETS for s in S_VALUES]


def summary_table(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[str]:
    """Personalized test accuracy, algorithms x settings: the main table."""
    cols = settings()
    runs = {(a, c): runs_of(log, c, algorithm_overrides(a, tuned), seeds) for a in ALGORITHMS for c in cols}
    contenders = [a for a in ALGORITHMS if a not in REFERENCES]
    marked = {c: table_marks({a: runs[(a, c)] for a in contenders}) for c in cols}
    lines = [[a, *(cell(per_run(runs[(a, c)], "test"), mark=marked[c].get(a, "")) for c in cols)] for a in ALGORITHMS]
    rows = algorithm_rows(tuned)
    splits = {c: prior_runs(log, c, rows, seeds) for c in cols}
    for prior in PRIORS:
        lines.append([f"prior: {prior.replace('_', ' ')}", *(cell(per_run(splits[c], prior)) for c in cols)])
    return markdown_table(["algorithm", *cols], lines)


# --------------------------------------------------------------------------------- the plots
def write_plots(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d, title in DATASETS.items():  # metric against s per algorithm, 95% intervals
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for a in ALGORITHMS:
            pts = [(s, summarize(per_run(runs_of(log, f"{d}_s{s}", algorithm_overrides(a, tuned), seeds), "test")))
                   for s in S_VALUES]  # fmt: skip
            pts = [(s, u) for s, u in pts if math.isfinite(u.mean)]
            if pts:
                err = [0.0 if math.isnan(u.se) else u.mean - u.low for _, u in pts]
                ax.errorbar([s for s, _ in pts], [u.mean for _, u in pts], yerr=err, marker="o", capsize=3, label=a)
        rows = algorithm_rows(tuned)
        prior = [(s, mean(per_run(prior_runs(log, f"{d}_s{s}", rows, seeds), "client_majority"))) for s in S_VALUES]
        prior = [(s, v) for s, v in prior if math.isfinite(v)]
        if prior:
            ax.plot([s for s, _ in prior], [v for _, v in prior], "k--", label="prior: client majority")
        ax.set(xlabel="s (share of rows sorted by label)", ylabel="personalized test accuracy", title=title)
        _legend(ax, ncol=3)
        paths.append(_save(fig, folder / f"{d}_accuracy_vs_s.png"))
    for setting in ("rt2_s0.5", "rt3_s0.5"):  # per-client bars
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / len(ALGORITHMS)
        for i, a in enumerate(ALGORITHMS):
            runs = runs_of(log, setting, algorithm_overrides(a, tuned), seeds)
            if runs:
                per_client = [mean(r["test"][k] for r in runs) for k in range(len(runs[0]["test"]))]
                ax.bar([k + i * width for k in range(len(per_client))], per_client, width, label=a)
        rows = algorithm_rows(tuned)
        splits = prior_runs(log, setting, rows, seeds)
        if splits:  # each client's own majority label, across its group of bars
            n = len(splits[0]["client_majority"])
            prior = [mean(r["client_majority"][k] for r in splits) for k in range(n)]
            ax.hlines(prior, [k - width / 2 for k in range(n)], [k + 0.8 - width / 2 for k in range(n)],
                      colors="k", linestyles="--", label="prior: client majority")  # fmt: skip
            ax.set_xticks([k + 0.4 - width / 2 for k in range(n)], [str(k) for k in range(n)])
        ax.set(xlabel="client", ylabel="personalized test accuracy (mean over seeds)", title=f"Per client, {setting}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(_save(fig, folder / f"{setting}_clients.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))  # PF2LoRA's learned rank and private energy against s
    for d in DATASETS:
        for ax, key, label in (
            (axes[0], "entropy_rank", "entropy rank"),
            (axes[1], "private_energy", "private energy"),
        ):
            pts = []
            for s in S_VALUES:
                vals = [x for r in runs_of(log, f"{d}_s{s}", algorithm_overrides(PF2LORA, tuned), seeds)
                        for x in r.get(key) or [] if x is not None]  # fmt: skip
                if vals:
                    pts.append((s, min(vals), mean(vals), max(vals)))
            if pts:
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[2] for p in pts], marker="o", label=d)
                ax.fill_between(xs, [p[1] for p in pts], [p[3] for p in pts], alpha=0.2)
            ax.set(xlabel="s", ylabel=f"{label} (min-mean-max over clients and seeds)")
    axes[0].set_title("PF2LoRA: learned rank of s B A + s~ D C")
    axes[1].set_title("PF2LoRA: private share of the update's energy")
    for ax in axes:
        _legend(ax)
    paths.append(_save(fig, folder / "pf2lora_rank_vs_s.png"))
    return paths


def _legend(ax: Any, ncol: int = 1) -> None:
    if ax.get_legend_handles_labels()[0]:  # a plot with nothing finished yet has no legend
        ax.legend(fontsize=7, ncol=ncol)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- the README
def run_time(log: RunLog, jobs: Sequence[Job]) -> tuple[int, float, float]:
    """Runs done, their summed seconds, and the seconds the missing ones would take (mean of their kind)."""
    kinds: dict[tuple[str, str], list[float]] = {}
    for j in jobs:
        r = log.result(j)
        if r is not None:
            kinds.setdefault((j.setting[:3], j.overrides[0]), []).append(float(r.get("seconds", 0.0)))
    done = [x for xs in kinds.values() for x in xs]
    overall = mean(done) if done else 0.0
    missing = sum(mean(kinds.get((j.setting[:3], j.overrides[0])) or [overall]) for j in jobs if log.result(j) is None)
    return len(done), sum(done), missing


def header(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int]) -> list[str]:
    sz = log.sizes
    per = sz.examples // sz.clients
    jobs = list({j.key: j for stage in STAGES for j in jobs_of(stage, tuned, seeds)}.values())
    n_done, seconds, missing = run_time(log, jobs)
    wall = (seconds + missing) / 2 / 3600  # two runs at a time on two cores
    state = (
        f"all {n_done} runs done" if n_done == len(jobs)
        else f"{n_done} of {len(jobs)} runs done (the cells of the others say \"not run yet\"; they would add about "
        f"{missing / 3600:.1f} h of run time)"
    )  # fmt: skip
    return [
        "# Results: PF2LoRA against the field on data it was not tuned on",
        "",
        "Regenerate (resumable: `results/runs.jsonl` holds every finished run and this file is rendered from it):",
        "",
        "```bash",
        "make results        # = .venv/bin/python -m benchmarks.results --workers 2",
        "```",
        "",
        f"Setting: packaged MiniLM-L6 (mean pooling), {sz.clients} clients x {per} Rotten Tomatoes snippets "
        f"({round(per * 0.7)} train / {round(per * 0.1)} validation / {round(per * 0.2)} test per client), s-split "
        f"partition, {sz.rounds} rounds x {sz.local_steps} local steps of 16, seeds {', '.join(map(str, seeds))}. "
        + PF2LORA_NOTE.get(PF2LORA, "")
        + "Configurations: what `pf2lora-tune` chose on validation splits of `experiment=offline_compare` "
        "(`tune_offline_compare/`, the same reduced protocol for every algorithm); `ffa_lora` and `centralized` were "
        "not tuned there and run at their defaults. Cells: mean ± standard error over seeds of the mean over "
        "clients; `*` the best federated row, `≈` a row whose difference to the best lies inside the 95% Welch "
        "interval (it cannot be told apart from the best with these seeds); `centralized` (every client's "
        "data pooled on one node) is a reference, never marked. Prior rows: each client's own majority "
        "training label, and the pooled one, scored on the test splits: a method at its prior learned no more "
        "than the label skew. Rank (5%): singular values of the client's update above 5% of the largest; "
        "entropy rank: `exp` of the entropy of the normalised spectrum (scale-free); private energy: "
        "`||s~ D C||^2 / (||s B A||^2 + ||s~ D C||^2)`.",
        "",
        f"Run time: {state}; {seconds / 3600:.1f} h summed over the runs done, on a 2-core CPU without GPU, "
        f"two runs at a time. The whole regeneration takes about {wall:.1f} h of wall time on such a machine "
        "(half the summed run time). `runs.jsonl` also holds the robustness benchmark's runs "
        "(`robustness/README.md`), which share this file.",
        "",
    ]


def kept_prose(readme: Path) -> str:
    """The hand-written block between the prose markers of ``readme`` (a placeholder where there is none)."""
    if readme.exists():
        text = readme.read_text(encoding="utf-8")
        if PROSE_START in text and PROSE_END in text:
            return text[text.index(PROSE_START) : text.index(PROSE_END) + len(PROSE_END)]
    return f"{PROSE_START}\n(No prose yet.)\n{PROSE_END}"


def write_readme(readme: Path, lines: Sequence[str]) -> Path:
    readme.parent.mkdir(parents=True, exist_ok=True)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(readme)  # atomic: a killed regeneration never leaves a torn README
    return readme


def render(log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], out: Path) -> Path:
    """Write ``out / README.md`` from the finished runs, keeping its prose block; returns its path."""
    readme = out / "README.md"
    plots = write_plots(log, tuned, seeds, out / "plots") if log.done else []
    lines = [
        *header(log, tuned, seeds),
        kept_prose(readme),
        "",
        "## Personalized test accuracy",
        "",
        *summary_table(log, tuned, seeds),
        "",
    ]
    algorithms = {a: (config_text(a, tuned), algorithm_overrides(a, tuned)) for a in ALGORITHMS}
    for setting in settings():
        d, _, s = setting.partition("_s")
        lines += [f"## {DATASETS[d]}, s = {s}", "", *setting_table(log, setting, algorithms, seeds), ""]
    base = algorithm_overrides(PF2LORA, tuned)
    variants = {name: (" ".join(f"`{o}`" for o in x) or "tuned PF2LoRA", (*base, *x)) for name, x in ABLATIONS.items()}
    for setting in ABLATION_SETTINGS:
        lines += [f"## PF2LoRA's ablations, {setting}", "", *setting_table(log, setting, variants, seeds), ""]
    lines += ["## Plots", "", *(f"![{p.stem}](plots/{p.name})" for p in plots), ""]
    return write_readme(readme, lines)


def regenerate(
    stages: Sequence[str], log: RunLog, tuned: Mapping[str, list[str]], seeds: Sequence[int], workers: int,
    cache: Path, out: Path, render_each: bool = True, jobs_for: Callable = jobs_of, render_with: Callable = render,
) -> list[Job]:  # fmt: skip
    """Run what ``stages`` miss in ``log``, re-rendering ``out / README.md`` after every run; the failed jobs.

    ``jobs_for(stage, tuned, seeds)`` and ``render_with(log, tuned, seeds, out)``: another benchmark's
    jobs and README on the same runner (``benchmarks.cross_device``).
    """
    jobs = [j for stage in stages if stage for j in jobs_for(stage, tuned, seeds)]
    start = time.time()
    on_done = (lambda *_: render_with(log, tuned, seeds, out)) if render_each else None
    failed = run_all(jobs, log, workers, cache, on_done=on_done)
    print(f"done in {time.time() - start:.0f} s wall", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render-only", action="store_true", help="re-render README.md from runs.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny runs into a temporary directory; checks them")
    add_run_arguments(parser, SEEDS)
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke(args.cache)
    sizes, seeds = run_arguments(args)
    log = RunLog(args.out / "runs.jsonl", sizes)
    tuned = tuned_overrides()
    failed = []
    if not args.render_only:
        failed = regenerate(args.stages.split(","), log, tuned, seeds, args.workers, args.cache, args.out)
    print(f"wrote {render(log, tuned, seeds, args.out)}")
    return 1 if failed else 0


SMOKE_STAGES = ("rt2_s0.5", "rt3_s0.5", "ablations")  # every kind of job (the s values differ by a number)


def smoke(cache: Path) -> int:
    """``--smoke``: ``SMOKE_STAGES`` at ``TinySizes`` (tiny BERT, 2 clients, 1 round of 1 step), seed 0.

    The log, README and plots go to a temporary directory: ``results/`` must be left as it was.
    Checks: every job ran; each run's per-client test and validation accuracies lie in [0, 1], it
    trained on examples and counted FLOPs; its log line parses; the README's tables of the smoke
    stages hold every row; every plot was written.
    """
    from benchmarks.smoke import Checks, fingerprint, tiny_sizes

    checks, before, seeds = Checks("results"), fingerprint(), [0]
    with tempfile.TemporaryDirectory(prefix="pf2lora-smoke-results-") as tmp:
        out = Path(tmp) / "results"
        log = RunLog(out / "runs.jsonl", tiny_sizes(Path(tmp)))
        tuned = tuned_overrides()
        failed = regenerate(SMOKE_STAGES, log, tuned, seeds, 2, cache, out, render_each=False)
        readme = render(log, tuned, seeds, out)
        jobs = {j.key: j for stage in SMOKE_STAGES for j in jobs_of(stage, tuned, seeds)}
        checks.require(not failed, f"no failed run ({len(failed)} failed)")
        lines = (out / "runs.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [checks.json_line(line, "a runs.jsonl line") for line in lines]
        checks.require(sorted(r["key"] for r in rows if r) == sorted(jobs), f"one log line per job ({len(jobs)})")
        for key, job in jobs.items():
            result = log.done.get(key)
            name = f"{job.setting} {' '.join(job.overrides)}"
            if not checks.require(result is not None, f"{name}: ran"):
                continue
            for split in ("test", "validation"):
                values = result[split]
                checks.require(len(values) == log.sizes.clients, f"{name}: {split} of every client")
                for k, value in enumerate(values):
                    checks.finite(value, f"{name}: client {k} {split}", 0.0, 1.0)
            checks.finite(result["examples_per_round"], f"{name}: examples_per_round", low=1.0)
            checks.finite(result["flops_per_round"], f"{name}: flops_per_round", low=1.0)
        text = readme.read_text(encoding="utf-8")
        for stage in SMOKE_STAGES[:-1]:
            d, _, s = stage.partition("_s")
            section = text.split(f"## {DATASETS[d]}, s = {s}\n", 1)[-1].split("\n## ", 1)[0]
            row = re.search(rf"^\|\s*{PF2LORA}\s*\|", section, flags=re.M)  # tabulate pads the cells
            checks.require("not run yet" not in section and row is not None, f"README table of {stage} full")
        ablations = text.split("## PF2LoRA's ablations", 1)[-1].split("\n## ", 1)[0]
        checks.require("not run yet" not in ablations, "README table of the ablations full")
        plots = sorted(p.name for p in (out / "plots").glob("*.png"))
        checks.require(len(plots) == 5, f"every plot written: {plots}")
        print(json.dumps({"runs": len(log.done), "failed": len(failed), "plots": len(plots)}))
    checks.require(fingerprint() == before, "results/ untouched")
    return checks.finish()


if __name__ == "__main__":
    raise SystemExit(main())
