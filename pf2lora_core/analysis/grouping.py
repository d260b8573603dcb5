"""Grouping a sweep's runs: by algorithm and swept values, with their statistics over seeds, and the x axis.

Override keys whose value differs between jobs are *swept*; the others are the fixed setting.
Finished runs are grouped by algorithm and the values of the swept keys other than ``algorithm``
and ``seed``; a group's runs are its seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pf2lora_core.analysis.loading import QUANTITIES, SEED_KEY, ReportError, Run, Sweep
from pf2lora_core.analysis.statistics import Summary, summarize

# The heterogeneity knob of the s-split partition: the natural x axis of the paper's figures.
DEFAULT_X_KEY = "partition.s"


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
        raise ReportError(f"--at {at!r} is not a value of {x_key}; values: {', '.join(fmt_x(x) for x in xs)}")
    return match[0]


def fmt_x(value: float) -> str:
    return f"{value:g}"


def values_of(group: Group, name: str) -> list[float]:
    """One quantity of every run of the group (one per seed), NaN where missing."""
    return [r.values[name] for r in group.runs]


def setting_of(group: Group) -> tuple[str | None, ...]:
    return tuple(group.values.values())


def prior_values(groups: Sequence[Group], name: str) -> list[float]:
    """A prior per seed of these groups (one split per seed: the algorithms share it)."""
    by_seed: dict[str, float] = {}
    for g in groups:
        for r in g.runs:
            if math.isfinite(r.values[name]):
                by_seed.setdefault(r.overrides.get(SEED_KEY, r.job), r.values[name])
    return list(by_seed.values())


def metric_label(groups: Sequence[Group]) -> str:
    """The metric of the groups' runs (several joined by `` / `` should a sweep mix them)."""
    return " / ".join(dict.fromkeys(r.metric for g in groups for r in g.runs))
