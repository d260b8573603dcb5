"""``pf2lora-sweep``: one experiment, or a Hydra multirun of them, each a real ``flwr run``.

::

    pf2lora-sweep experiment=offline_quick algorithm=homlora             # one run
    pf2lora-sweep -m experiment=offline_quick algorithm=pf2lora,homlora partition.s=0.3,0.9 seed=0,1

Every job runs the same Flower app as ``flwr run .`` (a subprocess with its own ``FLWR_HOME``,
whose local SuperLink is stopped afterwards); its run directory is the job's directory,
``<output_dir>/sweeps/<name>/<overrides>/`` (``hydra.sweep.dir`` moves it). What makes a sweep
usable on a shared machine:

- *validated first*: every job's configuration is composed and validated before the first job
  starts, so a typo in the last value of a sweep fails in a second, naming the key;
- *failures are data*: a job that fails is recorded in its directory (``failed.json``: error and
  log tail) and the sweep goes on;
- *resumable*: running the same sweep again skips jobs whose ``summary.json`` exists and retries
  the failed ones;
- *reported*: at the end, ``report.md`` / ``report.csv`` / ``plots/`` are (re)built from every job
  directory of the sweep (``pf2lora-report DIR`` does the same by hand).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pf2lora_core.config import ConfigError
from pf2lora_core.constants import FAILED_FILE, JOB_FILE, PERSONALIZED, SUMMARY_FILE
from pf2lora_core.experiment import Experiment, conf_dir, load
from pf2lora_core.launch import federation_config, flwr_run
from pf2lora_core.models import resolve_model
from pf2lora_core.outputs import atomic_write_bytes, set_aside_run

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


OmegaConf.register_new_resolver("pf2lora_slug", slug, replace=True)


# ------------------------------------------------------------------------------ sweep planning
def expand(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a multirun: the cartesian product of comma / range sweeps (Hydra's order)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's grammar errors name the offending override
        raise ConfigError(f"invalid override: {str(err).strip().splitlines()[0]}") from None
    choices = []
    for o in parsed:
        key = o.input_line.split("=", 1)[0]
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*choices)]


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
    summary: dict[str, Any] = field(default_factory=dict)


def run_job(overrides: Sequence[str], job_dir: Path, flwr_home: Path, timeout: float) -> JobResult:
    """Run one experiment through Flower into ``job_dir`` unless it already finished there."""
    job_dir.mkdir(parents=True, exist_ok=True)
    ident = experiment_overrides(overrides)
    summary_path = job_dir / SUMMARY_FILE
    if summary_path.exists():
        _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "done"})
        return JobResult("skipped", summary=_read_json(summary_path))
    (job_dir / FAILED_FILE).unlink(missing_ok=True)  # a retry: forget the previous failure
    set_aside_run(job_dir)  # the failed attempt's run files move to attempt-<time>/ (a run_dir must be fresh)
    _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "running"})
    start = time.perf_counter()
    try:
        exp = load(ident)
        proc = _launch(exp, ident, job_dir, flwr_home, timeout)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not summary_path.exists():
            raise RuntimeError(_error_line(log, proc.returncode), log)
    except subprocess.TimeoutExpired as err:
        return _failed(job_dir, ident, f"timed out after {timeout:.0f} s (sweep.job_timeout_s)", str(err.output or ""))
    except RuntimeError as err:
        return _failed(job_dir, ident, str(err.args[0]), str(err.args[1]) if len(err.args) > 1 else "")
    except Exception as err:  # anything else in this job must not stop the sweep
        return _failed(job_dir, ident, f"{type(err).__name__}: {err}", "")
    _write_json(job_dir / JOB_FILE, {"overrides": ident, "status": "done"})
    return JobResult("done", time.perf_counter() - start, summary=_read_json(summary_path))


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
    return flwr_run(overrides, federation_config(exp), flwr_home, app_dir, timeout, extra_env=_offline_env(exp))


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


def _failed(job_dir: Path, overrides: Sequence[str], error: str, log: str) -> JobResult:
    _write_json(job_dir / FAILED_FILE, {"overrides": list(overrides), "error": error, "log_tail": log[-LOG_TAIL:]})
    _write_json(job_dir / JOB_FILE, {"overrides": list(overrides), "status": "failed"})
    return JobResult("failed", error=error)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------ Hydra entry
_STATE: dict[str, Any] = {"total": None, "sweep_dir": None, "counts": {}}


def _progress(index: int, overrides: Sequence[str], result: JobResult) -> str:
    total = _STATE["total"] or "?"
    what = " ".join(overrides) or "(defaults)"
    if result.status == "failed":
        return f"[{index}/{total}] FAILED  {what}: {result.error}"
    pers = result.summary.get(PERSONALIZED, {})
    score = pers.get("mean")
    tail = f"personalized mean {score:.4f}" if isinstance(score, float) and math.isfinite(score) else "no score"
    verb = "skipped (finished before)" if result.status == "skipped" else f"done in {result.seconds:.0f} s"
    return f"[{index}/{total}] {verb:<26} {what}: {tail}"


def _hydra_task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job_dir = Path(hc.runtime.output_dir)
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    home_root = Path(hc.sweep.dir) if multirun else job_dir
    _STATE["sweep_dir"] = Path(hc.sweep.dir) if multirun else None
    index = (hc.job.num + 1) if multirun else 1
    result = run_job(overrides, job_dir, (home_root / ".flwr_home").resolve(), float(cfg.sweep.job_timeout_s))
    _STATE["counts"][result.status] = _STATE["counts"].get(result.status, 0) + 1
    print(_progress(index, experiment_overrides(overrides), result), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: validate every job, run them through Hydra, then write the report."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    try:
        jobs = expand(overrides) if multirun else [overrides]
        validate_jobs(jobs)
    except ConfigError as err:
        print(f"pf2lora-sweep: {err}", file=sys.stderr)
        return 2
    _STATE.update(total=len(jobs), sweep_dir=None, counts={})
    print(f"pf2lora-sweep: {len(jobs)} job(s)", flush=True)
    entry = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_hydra_task)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "pf2lora-sweep", *args]
    try:
        entry()
    finally:
        sys.argv = saved
    counts = _STATE["counts"]
    print("pf2lora-sweep: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), flush=True)
    sweep_dir = _STATE["sweep_dir"]
    if sweep_dir is not None:
        _report(sweep_dir, load(experiment_overrides(jobs[0])))
    return 1 if counts.get("failed") else 0


def _report(sweep_dir: Path, exp: Experiment) -> None:
    from pf2lora_core.report import build_report

    sweep = exp.cfg.sweep
    try:
        path = build_report(sweep_dir, x_key=str(sweep.report_x) or None, at=str(sweep.report_at) or None)
    except ValueError as err:  # a report option that does not fit this sweep: the runs stay
        print(f"pf2lora-sweep: report not written: {err} (fix it and run pf2lora-report {sweep_dir})", file=sys.stderr)
        return
    print(f"pf2lora-sweep: report {path}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
