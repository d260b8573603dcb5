"""``pf2lora-tune``: one tuning protocol for every algorithm, through Hydra's Optuna sweeper.

::

    pf2lora-tune experiment=offline_compare                               # the issue's 7 algorithms
    pf2lora-tune --algorithms pf2lora,homlora --trials 4 --final-seeds 10,11,12 experiment=offline_compare

Per algorithm it runs ``pf2lora-sweep -m <overrides> algorithm=<a> tune=<a>`` (``conf/tune/<a>.yaml``,
or ``conf/tune/default.yaml`` for an algorithm with no level of its own): Hydra's Optuna sweeper
draws the trials from the search space declared there, each trial runs every tuning seed
(``sweep.seeds``) and its objective is the mean validation metric over them. The best trial is
then chosen from the trial directories on validation only (``analysis.loading.validation_mean``), its
values re-run on fresh seeds (never the tuning seeds), and ``tune_report.md`` / ``tune_report.csv``
give per algorithm the chosen values, validation and test mean ± std (± standard error, 95%
interval) over the fresh seeds, the label-prior rows, and examples and FLOPs per round.

Output directory (``--out``, default ``<output_dir>/tune/<name>``)::

    trials/<algorithm>/<trial>/seed=<s>/     one run directory per trial and tuning seed (+ report.md)
    trials/<algorithm>/optimization_results.yaml   Optuna's own record of its best trial
    final/<algorithm>/<job>/                 the chosen configuration on each fresh seed (+ report.md)
    tune_report.md, tune_report.csv, tune.json (what was chosen, from which trials)

Running the same command again skips every finished run (the sampler is seeded, so it redraws
the same trials) and retries failed ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pf2lora_core.analysis.loading import (
    PRIORS,
    ReportError,
    Run,
    load_sweep,
    lower_is_better,
    validation_mean,
)
from pf2lora_core.analysis.statistics import marks, summarize, t975
from pf2lora_core.analysis.tables import cell, markdown_table
from pf2lora_core.config.experiment import conf_dir
from pf2lora_core.config.keys import SUMMARY_FILE
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.run.records import RecordError, Summary
from pf2lora_core.run.run_dir import atomic_write_bytes
from pf2lora_core.tools import sweep
from pf2lora_core.tools.launch import sigterm_as_interrupt

# The comparison of issue 12: PF2LoRA against the baselines a reviewer asks for.
DEFAULT_ALGORITHMS = ("pf2lora", "homlora", "fedsa_lora", "feddpa", "perfedavg", "hetlora", "local")
DEFAULT_FINAL_SEEDS = (100, 101, 102)  # 3 fresh seeds, disjoint from the tuning seeds (0, 1, 2)
FALLBACK_SPACE = "default"  # conf/tune/default.yaml: the common learning rate only
TUNE_MD, TUNE_CSV, TUNE_JSON = "tune_report.md", "tune_report.csv", "tune.json"


class TuneError(ValueError):
    """Tuning cannot go on; the message says what to fix."""


@dataclass(frozen=True)
class Trial:
    """One configuration the sampler drew: its values and its runs (one per tuning seed)."""

    values: dict[str, str]  # search-space key -> value
    runs: list[Run]
    objective: float  # mean validation metric over the tuning seeds; NaN when a seed is missing


@dataclass(frozen=True)
class Choice:
    """An algorithm's tuning outcome and its re-runs on fresh seeds."""

    algorithm: str
    space: str
    values: dict[str, str]
    objective: float
    trials_done: int
    trials_total: int
    final: list[Run]


# ------------------------------------------------------------------------------------- planning


def search_space(algorithm: str) -> str:
    """The ``conf/tune`` option of an algorithm: its own file, else the shared default."""
    return algorithm if (conf_dir() / "tune" / f"{algorithm}.yaml").is_file() else FALLBACK_SPACE


def _check(
    overrides: Sequence[str], algorithms: Sequence[str], final_seeds: Sequence[int], search: Sequence[str]
) -> tuple[dict[str, list[str]], list[int]]:
    """Every algorithm's tuning plan composed and validated; returns its search keys and tuning seeds."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    for banned in ("algorithm", "tune", "seed", "hydra.sweep.dir", "hydra/sweeper"):
        if banned in keys:
            raise TuneError(f"{banned}=... is set by pf2lora-tune itself (use --algorithms / --final-seeds)")
    if not algorithms:
        raise TuneError("--algorithms is empty")
    spaces, seeds = {}, []
    for a in algorithms:
        plan = sweep.plan([*overrides, f"algorithm={a}", f"tune={search_space(a)}", *search], multirun=True)
        sweep.validate_plan(plan)
        sweep.validate_jobs([[*_without_seeds(overrides), f"algorithm={a}", f"seed={s}"] for s in final_seeds])
        spaces[a] = list((plan.cfg.hydra.sweeper.get("params") or {}).keys())
        seeds = [int(s) for s in plan.cfg.sweep.seeds]
        if not seeds:
            raise TuneError("sweep.seeds is empty: the tuning seeds (conf/tune/default.yaml) must list at least one")
    if set(seeds) & set(final_seeds):
        raise TuneError(f"--final-seeds {list(final_seeds)} overlap the tuning seeds {seeds}: use fresh seeds")
    return spaces, seeds


# ------------------------------------------------------------------------------------- choosing


def read_trials(trial_dir: Path, keys: Sequence[str], seeds: Sequence[int]) -> list[Trial]:
    """The trials of one algorithm's tuning sweep, read from their run directories."""
    try:
        runs = load_sweep(trial_dir).runs
    except ReportError:
        return []
    grouped: dict[tuple[str, ...], list[Run]] = {}
    for r in runs:
        grouped.setdefault(tuple(r.overrides.get(k, "") for k in keys), []).append(r)
    return [Trial(dict(zip(keys, v, strict=True)), rs, _objective(rs, seeds)) for v, rs in grouped.items()]


def _objective(runs: Sequence[Run], seeds: Sequence[int]) -> float:
    """Mean validation metric over the tuning seeds; NaN unless every seed has one."""
    by_seed = {r.overrides.get("seed"): r.values["validation"] for r in runs}
    values = [by_seed.get(str(s), math.nan) for s in seeds]
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.nan


def best_trial(trials: Sequence[Trial], metric: str) -> Trial:
    """The trial with the best validation objective (never a test number); raises when none has one."""
    scored = [t for t in trials if math.isfinite(t.objective)]
    if not scored:
        raise TuneError("no trial has a validation metric on every tuning seed")
    sign = -1.0 if lower_is_better(metric) else 1.0
    return max(scored, key=lambda t: sign * t.objective)


def _missing_validation(trial_dir: Path) -> str:
    """Why a finished run has no validation number, read from one of its summaries."""
    for path in sorted(trial_dir.glob(f"*/*/{SUMMARY_FILE}")):
        try:
            validation_mean(Summary.read(path))
        except RecordError:
            continue  # a torn summary says nothing about validation; the next may
        except ValueError as err:
            return f": {err}"
    return f" (see failed.json and job.log under {trial_dir})"


# ------------------------------------------------------------------------------------- running


def tune(
    overrides: Sequence[str],
    algorithms: Sequence[str],
    final_seeds: Sequence[int],
    out: Path,
    trials: int | None = None,
) -> list[Choice]:
    """Tune each algorithm through Hydra's sweeper, choose on validation, re-run on fresh seeds.

    ``overrides`` define the experiment (both phases); ``trials`` replaces ``hydra.sweeper.n_trials``.
    """
    search = [f"hydra.sweeper.n_trials={trials}"] if trials is not None else []
    spaces, seeds = _check(overrides, algorithms, final_seeds, search)
    choices = []
    for a in algorithms:
        trial_dir = out / "trials" / a
        tune_args = [*overrides, f"algorithm={a}", f"tune={search_space(a)}", *search, f"hydra.sweep.dir={trial_dir}"]
        print(f"pf2lora-tune: {a}: {len(spaces[a])} key(s) searched: {', '.join(spaces[a])}", flush=True)
        if _sweep(["-m", *tune_args]) == 2:
            raise TuneError(f"the tuning sweep of {a} did not start (its error is above)")
        trials = read_trials(trial_dir, spaces[a], seeds)
        metric = next((r.metric for t in trials for r in t.runs), "")
        try:
            best = best_trial(trials, metric)
        except TuneError as err:
            raise TuneError(f"{a}: {err}{_missing_validation(trial_dir)}") from None
        chosen = [f"{k}={v}" for k, v in best.values.items()]
        print(f"pf2lora-tune: {a}: chose {' '.join(chosen)} (validation {best.objective:.4f})", flush=True)
        final_args = [*_without_seeds(overrides), f"algorithm={a}", *chosen, f"seed={','.join(map(str, final_seeds))}"]
        _sweep(["-m", *final_args, f"hydra.sweep.dir={out / 'final' / a}"])
        final = _final_runs(out / "final" / a)
        done = sum(math.isfinite(t.objective) for t in trials)
        n_trials = _n_trials([*overrides, *search], a)
        choices.append(Choice(a, search_space(a), best.values, best.objective, done, n_trials, final))
    write_outputs(choices, seeds, final_seeds, out)
    return choices


def _sweep(args: list[str]) -> int:
    """``pf2lora-sweep`` in process; an interrupted sweep (130) interrupts the tuning too."""
    code = sweep.main(args)
    if code == 130:
        raise KeyboardInterrupt
    return code


def _without_seeds(overrides: Sequence[str]) -> list[str]:
    """The experiment's overrides less ``sweep.seeds`` (tuning seeds): re-runs take one seed each."""
    return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "sweep.seeds"]


def _n_trials(overrides: Sequence[str], algorithm: str) -> int:
    plan = sweep.plan([*overrides, f"algorithm={algorithm}", f"tune={search_space(algorithm)}"], multirun=True)
    return int(plan.total or 0)


def _final_runs(final_dir: Path) -> list[Run]:
    try:
        return load_sweep(final_dir).runs
    except ReportError:
        return []


# ------------------------------------------------------------------------------------- writing

COLUMNS = ("validation", "personalized")  # chosen on / reported on: validation and test


def _metric(choices: Sequence[Choice]) -> str:
    return next((r.metric for c in choices for r in c.final), "")


def _values(runs: Sequence[Run], name: str) -> list[float]:
    return [r.values[name] for r in runs]


def _summary(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """Mean, std, se, 95% interval of the finite values (NaN where undefined): the CSV's columns."""
    s = summarize(values)
    return s.mean, s.std, s.se, s.low, s.high


def _cell(values: Sequence[float], mark: str = "") -> str:
    """``mean ± std (se x) [95% interval]``: the spread over the fresh seeds, and the mean's uncertainty."""
    return cell(values, mark=mark, std=True, interval=True)


def _marks(choices: Sequence[Choice], name: str, metric: str) -> dict[str, str]:
    """``*`` the best algorithm in this column, ``≈`` those inside the 95% Welch interval of its difference."""
    return marks({c.algorithm: _values(c.final, name) for c in choices}, lower_is_better(metric))


def _prior(choices: Sequence[Choice], name: str) -> list[float]:
    by_seed: dict[str, float] = {}
    for c in choices:
        for r in c.final:
            if math.isfinite(r.values[name]):
                by_seed.setdefault(r.overrides.get("seed", r.job), r.values[name])
    return list(by_seed.values())


def _cost(runs: Sequence[Run], name: str, fmt: str) -> str:
    mean = summarize(_values(runs, name)).mean
    return "-" if math.isnan(mean) else f"{mean:{fmt}}"


def render(choices: Sequence[Choice], seeds: Sequence[int], final_seeds: Sequence[int]) -> str:
    metric = _metric(choices) or "-"
    n = len(final_seeds)
    marked = {name: _marks(choices, name, metric) for name in COLUMNS}
    head = ["algorithm", "chosen values", "trials", "tuning objective", "validation", "test", "n",
            "examples / round", "FLOPs / round"]  # fmt: skip
    rows = []
    for c in choices:
        chosen = " ".join(f"`{k}={_short(v)}`" for k, v in c.values.items()) or "-"
        cells = [_cell(_values(c.final, name), marked[name].get(c.algorithm, "")) for name in COLUMNS]
        cost = [_cost(c.final, "examples_per_round", ",.0f"), _cost(c.final, "flops_per_round", ".3g")]
        trials = f"{c.trials_done}/{c.trials_total}"
        rows.append([c.algorithm, chosen, trials, f"{c.objective:.4f}", *cells, str(len(c.final)), *cost])
    for q in PRIORS:
        rows.append([f"prior: {q.name}", "-", "-", "-", "-", _cell(_prior(choices, q.name)), "-", "-", "-"])
    t = t975(n - 1) if n > 1 else math.nan
    return "\n".join([
        "# Tuning report",
        "",
        f"Metric: {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better). Each algorithm: "
        f"the same number of trials drawn by Hydra's Optuna sweeper (TPE, seeded) from its search space "
        f"(conf/tune/), every trial on the tuning seeds {list(seeds)}; the trial with the best mean "
        "validation metric (personalized; global for methods without personalization) is chosen, on "
        "validation only, then re-run on the fresh seeds "
        f"{list(final_seeds)}. The table gives those re-runs: mean ± sample std (se: standard error) "
        f"[95% t-interval, t = {t:.3f} for n = {n}]. 'tuning objective' is the chosen trial's mean "
        "validation metric over the tuning seeds (optimistic: it was selected).",
        "",
        "Marks per column: * the best algorithm; ≈ an algorithm whose difference to the best lies inside "
        "the 95% Welch t-interval of that difference: with these seeds it cannot be told apart from the best. "
        "Prior rows: each client's majority label on its own test split (client_majority) and the global "
        "majority label (global_majority), as accuracies; a method at or below them has learned no more "
        "than the label prior.",
        "",
        *markdown_table(head, rows),
        "",
    ])  # fmt: skip


def _short(value: str) -> str:
    """A sampled float in 4 significant digits for reading (tune.json and the CSV keep it whole)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def write_outputs(choices: Sequence[Choice], seeds: Sequence[int], final_seeds: Sequence[int], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / TUNE_MD, render(choices, seeds, final_seeds).encode())
    _write_csv(choices, out / TUNE_CSV)
    record = {
        "tuning_seeds": list(seeds),
        "final_seeds": list(final_seeds),
        "algorithms": {
            c.algorithm: {"search_space": c.space, "chosen": c.values, "validation_objective": c.objective,
                          "trials_done": c.trials_done, "trials_total": c.trials_total}
            for c in choices
        },
    }  # fmt: skip
    atomic_write_bytes(out / TUNE_JSON, (json.dumps(record, indent=2) + "\n").encode())


def _write_csv(choices: Sequence[Choice], path: Path) -> None:
    stats = [f"{k}_{s}" for k in ("validation", "test") for s in ("mean", "std", "se", "ci95_low", "ci95_high")]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["algorithm", "chosen", "tuning_objective", "n_seeds", *stats,
                         "examples_per_round", "flops_per_round"])  # fmt: skip
        for c in choices:
            nums = [v for name in COLUMNS for v in _summary(_values(c.final, name))]
            cost = [summarize(_values(c.final, k)).mean for k in ("examples_per_round", "flops_per_round")]
            chosen = " ".join(f"{k}={v}" for k, v in c.values.items())
            writer.writerow([c.algorithm, chosen, _num(c.objective), len(c.final), *map(_num, nums), *map(_num, cost)])
        for q in PRIORS:
            nums = [math.nan] * 5 + list(_summary(_prior(choices, q.name)))
            writer.writerow([f"prior:{q.name}", "", "", "", *map(_num, nums), "", ""])


def _num(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


# ------------------------------------------------------------------------------------- entry


def _ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _default_out(overrides: Sequence[str]) -> Path:
    cfg = sweep.plan(list(overrides), multirun=True).cfg
    return Path(str(cfg.output_dir)) / "tune" / str(cfg.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pf2lora-tune", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--algorithms", default=",".join(DEFAULT_ALGORITHMS), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument(
        "--trials", type=int, help="trials per algorithm (default: hydra.sweeper.n_trials of conf/tune)"
    )
    parser.add_argument(
        "--final-seeds", type=_ints, default=list(DEFAULT_FINAL_SEEDS), help="fresh seeds, e.g. 100,101,102"
    )
    parser.add_argument("--out", type=Path, help="output directory (default: <output_dir>/tune/<name>)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the experiment (experiment=offline_compare ...)"
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.trials is not None and args.trials < 1:
        parser.error("--trials must be at least 1")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    try:
        out = args.out or _default_out(overrides)
        with sigterm_as_interrupt():
            choices = tune(overrides, algorithms, args.final_seeds, out, args.trials)
    except (TuneError, ConfigError) as err:
        print(f"pf2lora-tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(sweep.INTERRUPTED.format(prog="pf2lora-tune"), file=sys.stderr, flush=True)
        return 130
    print(f"pf2lora-tune: report {out / TUNE_MD}", flush=True)
    return 0 if all(len(c.final) == len(args.final_seeds) for c in choices) else 1


if __name__ == "__main__":
    sys.exit(main())
