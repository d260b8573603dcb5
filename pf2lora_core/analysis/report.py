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

Usage: ``pf2lora-report DIR [--x KEY] [--at VALUE]``. The parts live in ``pf2lora_core.analysis``:
``loading`` (the jobs and their numbers), ``statistics`` (over seeds, and the marks), ``grouping``
(groups and the x axis), ``plotting`` and ``rendering`` (report.md, report.csv); this module runs them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pf2lora_core.analysis.grouping import group_runs, resolve_at, resolve_x
from pf2lora_core.analysis.loading import ReportError, load_sweep
from pf2lora_core.analysis.plotting import write_plots
from pf2lora_core.analysis.rendering import render_markdown, write_csv
from pf2lora_core.config.keys import PLOTS_DIR, REPORT_CSV, REPORT_MD


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
