"""``pf2lora-sweep``: one experiment, or a Hydra multirun of them, each a real ``flwr run``.

::

    pf2lora-sweep experiment=offline_quick algorithm=homlora             # one run
    pf2lora-sweep -m experiment=offline_compare algorithm=pf2lora,homlora partition.s=0.3,0.9 seed=0,1,2
    pf2lora-sweep -m algorithm='glob(*,exclude=[centralized,pf2lora_lm,pf2lora_exact])' \\
        '++hydra.sweeper.params={seed:"0,1,2"}'

Hydra's own sweeper expands and launches the jobs (``glob``, ``range``, ``choice``,
``hydra.sweeper.params``, ``hydra/sweeper=optuna`` for sampled searches); this module is the job
(the task function) and the bookkeeping around it. Every job runs the same Flower app as
``flwr run .`` (a subprocess with its own ``FLWR_HOME``, whose local SuperLink is stopped
afterwards); its run directory is the job's directory, ``<output_dir>/sweeps/<name>/<overrides>/``
(``hydra.sweep.dir`` moves it). What makes a sweep usable on a shared machine:

- *validated first*: every job's configuration is composed and validated before the first job
  starts, so a typo in the last value of a sweep fails in a second, naming the key
  (a sampled sweep: its fixed part, since the sampler draws the rest as it goes);
- *failures are data*: a job that fails is recorded in its directory (``failed.json``: error and
  log tail) and the sweep goes on; every job keeps its whole log (``job.log``), success or not;
- *progress*: a line when each job starts and when it ends, with the time the sweep has left
  (mean time of the jobs that ran x jobs to go);
- *resumable*: running the same sweep again skips jobs whose ``summary.json`` exists and retries
  the failed ones;
- *reported*: at the end, ``report.md`` / ``report.csv`` / ``plots/`` are (re)built from every job
  directory of the sweep (``pf2lora-report DIR`` does the same by hand).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pf2lora_core.config.experiment import Experiment, conf_dir, load
from pf2lora_core.config.keys import (
    FAILED_FILE,
    JOB_FILE,
    JOB_LOG_FILE,
    LOWER_IS_BETTER,
    PERSONALIZED,
    SUMMARY_FILE,
    VALIDATION,
)
from pf2lora_core.config.schema import ConfigError
from pf2lora_core.run.records import RecordError, Summary
from pf2lora_core.run.run_dir import atomic_write_bytes, set_aside_run
from pf2lora_core.tools.launch import (
    LaunchError,
    federation_config,
    flwr_run,
    refuse_comma_paths,
    sigterm_as_interrupt,
    simulation_env,
)
from pf2lora_core.training.models import resolve_model

# Overrides that steer the sweep itself, not the experiment: never part of a job's identity.
SWEEP_ONLY_PREFIXES = ("hydra.", "sweep.")
SLUG_MAX = 120
LOG_TAIL = 4000
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def slug(override_dirname: str) -> str:
    """A job directory name from Hydra's ``override_dirname``: one path component, filesystem-safe.

    Long names keep a readable prefix and end in a hash of the whole string, so two jobs never
    share a directory.
    """
    text = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_") or "default"
    if len(text) <= SLUG_MAX:
        return text
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{text[: SLUG_MAX - 11]}-{digest}"


def direction(metric: str) -> str:
    """Optuna's direction for a task metric: loss and perplexity are minimized, the rest maximized."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


OmegaConf.register_new_resolver("pf2lora_slug", slug, replace=True)
OmegaConf.register_new_resolver("pf2lora_direction", direction, replace=True)


# ------------------------------------------------------------------------------ sweep planning
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class Plan:
    """What Hydra will run: the composed primary config and, where the sweeper can say, every job."""

    cfg: DictConfig  # the primary config as Hydra composes it (``hydra`` node included, unresolved)
    jobs: list[list[str]] | None  # each job's overrides; None: the sweeper samples them (Optuna)
    total: int | None  # number of jobs (trials), when known


def _config_loader() -> Any:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))


def plan(overrides: Sequence[str], multirun: bool) -> Plan:
    """Hydra's own composition and expansion of a command line, before anything runs.

    The primary config is composed by Hydra's config loader (so ``hydra.sweeper.params``,
    ``hydra/sweeper=...`` and presets that set them count), and the jobs of Hydra's basic sweeper
    come from that sweeper's own ``split_arguments`` over a parser that knows the config groups
    (``glob(...)``, ``range(...)``, ``choice(...)``): the same list, in the same order, that the
    sweeper launches. Other sweepers (Optuna) sample their jobs as they go: ``jobs`` is None.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    loader = _config_loader()
    try:
        cfg = loader.load_configuration("config", list(overrides), RunMode.MULTIRUN if multirun else RunMode.RUN)
        task = [str(o) for o in cfg.hydra.overrides.task]
        if not multirun:
            return Plan(cfg, [task], 1)
        sweeper = cfg.hydra.sweeper
        if str(sweeper.get("_target_", "")) != BASIC_SWEEPER:
            n_trials = sweeper.get("n_trials")
            return Plan(cfg, None, int(n_trials) if n_trials is not None else None)
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]  # BasicSweeper._parse_config
        parsed = OverridesParser.create(config_loader=loader).parse_overrides([*params, *task])
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except (HydraException, OmegaConfBaseException, AssertionError, AttributeError) as err:
        # Hydra's errors name the offending override (a bad hydra.* value surfaces as the last two)
        raise ConfigError(f"invalid override: {str(err).strip().splitlines()[0]}") from None
    return Plan(cfg, [list(j) for j in jobs], len(jobs))


def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a multirun, as Hydra's basic sweeper expands them (cartesian product, its order)."""
    jobs = plan(overrides, multirun=True).jobs
    if jobs is None:
        raise ConfigError("expand: the configured sweeper samples its jobs; only the basic sweeper lists them")
    return jobs


def fixed_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides of a sampled sweep that hold one value (its search space left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=_config_loader()).parse_overrides(list(overrides))
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def experiment_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that define the experiment (``hydra.*`` and ``sweep.*`` left out)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(SWEEP_ONLY_PREFIXES)]


def validate_jobs(jobs: Sequence[Sequence[str]]) -> None:
    """Compose and validate every job before any runs; the first bad one raises ConfigError."""
    for job in jobs:
        where = " ".join(job) or "(no overrides)"
        try:
            exp = load(experiment_overrides(job))
        except ConfigError as err:
            raise ConfigError(f"{err} [job: {where}]") from None
        if exp.model.source != "hub":  # local files can be checked now; the Hub only at run time
            try:
                resolve_model(exp.model)
            except ValueError as err:
                raise ConfigError(f"invalid configuration: {err} [job: {where}]") from None
        if "'" in " ".join(job):
            raise ConfigError(f"override values cannot contain a single quote (TOML run config): {job}")


# ------------------------------------------------------------------------------ one job
@dataclass
class JobResult:
    status: str  # done | skipped | failed
    seconds: float = 0.0
    error: str = ""
    summary: Summary | None = None  # None: failed, or its summary.json is malformed


def run_job(overrides: Sequence[str], job_dir: Path, flwr_home: Path, timeout: float) -> JobResult:
    """Run one experiment through Flower into ``job_dir`` unless it already finished there."""
    job_dir.mkdir(parents=True, exist_ok=True)
    ident = experiment_overrides(overrides)
    summary_path = job_dir / SUMMARY_FILE
    if summary_path.exists():
        _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "done"})
        return JobResult("skipped", summary=_read_summary(summary_path))
    (job_dir / FAILED_FILE).unlink(missing_ok=True)  # a retry: forget the previous failure
    set_aside_run(job_dir)  # the failed attempt's run files move to attempt-<time>/ (a run_dir must be fresh)
    _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "running"})
    start = time.perf_counter()
    try:
        exp = load(ident)
        proc = _launch(exp, ident, job_dir, flwr_home, timeout)
        log = proc.stdout + proc.stderr
        _write_log(job_dir, log)
        if proc.returncode != 0 or not summary_path.exists():
            raise RuntimeError(_error_line(log, proc.returncode), log)
    except subprocess.TimeoutExpired as err:
        partial = _text(err.output) + _text(err.stderr)
        _write_log(job_dir, partial)
        return _failed(job_dir, ident, f"timed out after {timeout:.0f} s (sweep.job_timeout_s)", partial)
    except RuntimeError as err:
        return _failed(job_dir, ident, str(err.args[0]), str(err.args[1]) if len(err.args) > 1 else "")
    except Exception as err:  # anything else in this job must not stop the sweep
        return _failed(job_dir, ident, f"{type(err).__name__}: {err}", "")
    _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "done"})
    return JobResult("done", time.perf_counter() - start, summary=_read_summary(summary_path))


def _launch(
    exp: Experiment, ident: Sequence[str], job_dir: Path, flwr_home: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    run_overrides = [*ident, _quoted("run_dir", job_dir.resolve())]
    if exp.federation.kind == "simulation":
        run_overrides.append(_quoted("federation.state_dir", (job_dir / ".state").resolve()))
    app_dir = conf_dir().parent
    overrides = " ".join(run_overrides)
    if exp.federation.kind == "deployment":
        return flwr_run(overrides, None, None, app_dir, timeout, connection=exp.federation.connection)
    env = {**_offline_env(exp), **simulation_env(exp)}
    return flwr_run(overrides, federation_config(exp), flwr_home, app_dir, timeout, extra_env=env)


def _quoted(key: str, path: Path) -> str:
    """``key="path"`` for the app's override string: job directories are named after overrides
    (``a=1,b=2``), which Hydra reads as one value only when double-quoted. The app splits the
    string shell-style first, so the quotes (and any space) are backslash-escaped to survive it."""
    text = str(path)
    if any(c in text for c in "\"'\\\n"):
        raise ConfigError(f"{key}: the path {text!r} contains a quote, backslash or newline; choose another directory")
    escaped = text.replace(" ", "\\ ")
    return key + '=\\"' + escaped + '\\"'


def _offline_env(exp: Experiment) -> dict[str, str]:
    """Keep the Hub out of runs that only use packaged or local assets (no network waits)."""
    hub = exp.model.source == "hub" or exp.task.source == "hub"
    return {} if hub else OFFLINE_ENV


def _error_line(log: str, returncode: int) -> str:
    """The most telling line of a failed run's log: the last exception or error line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|Invalid)", ln):
            return ln[:500]
    return f"flwr run exited with code {returncode} and wrote no summary.json"


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _write_log(job_dir: Path, log: str) -> None:
    """The whole ``flwr run`` output of the job, kept beside its results (failed or not)."""
    atomic_write_bytes(job_dir / JOB_LOG_FILE, log.encode())


def run_seeds(
    overrides: Sequence[str], job_dir: Path, seeds: Sequence[int], home: Path, timeout: float
) -> list[JobResult]:
    """One job: its own seed in ``job_dir``, or (``sweep.seeds``) each seed in ``job_dir/seed=<s>/``."""
    if not seeds:
        return [run_job(overrides, job_dir, home, timeout)]
    return [run_job([*overrides, f"seed={s}"], job_dir / f"seed={s}", home, timeout) for s in seeds]


def _failed(job_dir: Path, overrides: Sequence[str], error: str, log: str) -> JobResult:
    _write_json(job_dir / FAILED_FILE, {"overrides": list(overrides), "error": error, "log_tail": log[-LOG_TAIL:]})
    _write_json(job_dir / JOB_FILE, {"overrides": list(overrides), "status": "failed"})
    return JobResult("failed", error=error)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_summary(path: Path) -> Summary | None:
    try:
        return Summary.read(path)
    except RecordError:
        return None  # the report lists the job as malformed, saying which field


# ------------------------------------------------------------------------------ Hydra entry
@dataclass
class _Progress:
    """The running sweep's bookkeeping: Hydra runs the jobs, this counts them and times them."""

    total: int | None = None
    started: float = field(default_factory=time.perf_counter)
    counts: dict[str, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)  # seconds of the jobs that really ran
    sweep_dir: Path | None = None

    def record(self, results: Sequence[JobResult]) -> None:
        for r in results:
            self.counts[r.status] = self.counts.get(r.status, 0) + 1
        ran = [r.seconds for r in results if r.status == "done"]
        if ran:
            self.durations.append(sum(ran))

    def time_left(self, done: int) -> str:
        """Mean time of the jobs that ran so far x jobs still to go (skipped ones cost nothing)."""
        if self.total is None or not self.durations:
            return ""
        left = max(self.total - done, 0) * statistics.fmean(self.durations)
        return f"; about {_duration(left)} left" if left > 0 else ""


_STATE = _Progress()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _score(summary: Summary | None, kind: str) -> str:
    block = summary.kinds.get(kind) if summary is not None else None
    return f"{kind} mean {block.mean:.4f}" if block is not None and math.isfinite(block.mean) else ""


def _progress(index: int, overrides: Sequence[str], results: Sequence[JobResult]) -> str:
    total = _STATE.total or "?"
    what = " ".join(overrides) or "(defaults)"
    failed = [r for r in results if r.status == "failed"]
    if failed:
        return f"[{index}/{total}] FAILED  {what}: {failed[0].error}"
    scores = [t for r in results[-1:] for t in (_score(r.summary, PERSONALIZED), _score(r.summary, VALIDATION)) if t]
    tail = ", ".join(scores) or "no score"
    seconds = sum(r.seconds for r in results)
    skipped = all(r.status == "skipped" for r in results)
    verb = "skipped (finished before)" if skipped else f"done in {seconds:.0f} s"
    seeds = f" ({len(results)} seeds, last: {tail})" if len(results) > 1 else f": {tail}"
    return f"[{index}/{total}] {verb:<26} {what}{seeds}"


def job_objective(results: Sequence[JobResult]) -> float:
    """The job's value for a sampling sweeper (Optuna): mean validation metric over its seeds.

    NaN when any seed failed or has no validation result, so the sweeper records a failed trial
    and goes on; ``pf2lora-tune`` reads the run directories, not this value, to choose.
    """
    from pf2lora_core.analysis.loading import validation_mean

    values = []
    for r in results:
        try:
            if r.summary is None:
                return math.nan
            values.append(validation_mean(r.summary))
        except ValueError:
            return math.nan
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.nan


def _hydra_task(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job_dir = Path(hc.runtime.output_dir)
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    home_root = Path(hc.sweep.dir) if multirun else job_dir
    _STATE.sweep_dir = Path(hc.sweep.dir) if multirun else None
    index = (hc.job.num + 1) if multirun else 1
    what = experiment_overrides(overrides)
    print(f"[{index}/{_STATE.total or '?'}] start {' '.join(what) or '(defaults)'}", flush=True)
    seeds = [int(s) for s in cfg.sweep.seeds]
    results = run_seeds(overrides, job_dir, seeds, (home_root / ".flwr_home").resolve(), float(cfg.sweep.job_timeout_s))
    _STATE.record(results)
    print(_progress(index, what, results) + _STATE.time_left(index), flush=True)
    return job_objective(results)


def validate_plan(p: Plan) -> None:
    """Every job composed and validated; for a sampled sweep, its fixed part and its seeds."""
    seeds = list(p.cfg.sweep.get("seeds") or [])
    jobs = p.jobs if p.jobs is not None else [fixed_overrides(p.cfg.hydra.overrides.task)]
    if seeds and any(o.lstrip("+~").split("=", 1)[0] == "seed" for job in jobs for o in job):
        raise ConfigError("sweep.seeds and seed both given: each job runs every seed of sweep.seeds; drop one")
    validate_jobs(jobs)


INTERRUPTED = (
    "{prog}: interrupted; the running job and every process it started are stopped, finished jobs "
    "are kept: the same command again resumes (it skips them)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: let Hydra compose and expand the sweep, validate every job, run them, report."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        the_plan = plan(overrides, multirun)
        validate_plan(the_plan)
        refuse_comma_paths(conf_dir().parent)  # else every job would fail the same way in `flwr run`
    except (ConfigError, LaunchError) as err:
        print(f"pf2lora-sweep: {err}", file=sys.stderr)
        return 2
    global _STATE
    _STATE = _Progress(total=the_plan.total)
    count = "" if the_plan.jobs is None else f"{len(the_plan.jobs)} job(s)"
    sampler = f"{the_plan.total or '?'} trial(s) sampled by {the_plan.cfg.hydra.sweeper._target_.rsplit('.', 1)[-1]}"
    print(f"pf2lora-sweep: {count or sampler}", flush=True)
    entry = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_hydra_task)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pf2lora-sweep", *args]
    try:
        with sigterm_as_interrupt():
            entry()
    except SystemExit as err:  # Hydra reports its own errors (printed above) by exiting
        hydra_failed = bool(err.code)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running job's processes are stopped by now
        print(INTERRUPTED.format(prog="pf2lora-sweep"), file=sys.stderr, flush=True)
        return 130
    else:
        hydra_failed = False
    finally:
        sys.argv = saved
    counts = _STATE.counts
    elapsed = _duration(time.perf_counter() - _STATE.started)
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no job ran"
    print(f"pf2lora-sweep: {summary}; {elapsed} in all", flush=True)
    if _STATE.sweep_dir is not None:
        _report(_STATE.sweep_dir, the_plan.cfg.sweep)
    return 1 if counts.get("failed") or hydra_failed else 0


def _report(sweep_dir: Path, sweep: DictConfig) -> None:
    from pf2lora_core.analysis.report import build_report

    try:
        path = build_report(sweep_dir, x_key=str(sweep.report_x) or None, at=str(sweep.report_at) or None)
    except ValueError as err:  # a report option that does not fit this sweep: the runs stay
        print(f"pf2lora-sweep: report not written: {err} (fix it and run pf2lora-report {sweep_dir})", file=sys.stderr)
        return
    print(f"pf2lora-sweep: report {path}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
