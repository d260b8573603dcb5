"""Statistics over seeds: mean, standard error, t-interval, Welch interval, and the best / ≈ marks.

The one implementation behind every table of the project: the sweep report (``pf2lora-report``),
the tuning report (``pf2lora-tune``) and ``benchmarks/results.py``. Each number is taken over the
*finite* values only: a seed whose run lacks a quantity (``None`` read as NaN) is left out of that
quantity, never counted as zero. Quantiles of Student's t come from ``scipy.stats.t``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from scipy import stats

CONFIDENCE = 0.95  # every interval of the project's tables is a two-sided 95% interval
BEST = "*"  # the best row of its column (and setting)
SAME = "≈"  # a row whose difference to the best row lies inside the 95% Welch interval
# Welch-Satterthwaite degrees of freedom are rounded down (a wider, conservative interval); the
# tolerance keeps an integer ``nu`` that floating point lands a hair below from losing one.
_DF_TOLERANCE = 1e-9

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Summary:
    """A sample of seeds: size, mean, sample std (``ddof=1``), standard error, 95% t-interval.

    ``std``, ``se``, ``low`` and ``high`` are NaN for fewer than two values; everything is NaN
    (and ``n`` is 0) for none.
    """

    n: int
    mean: float
    std: float
    se: float
    low: float
    high: float


def finite(values: Iterable[float]) -> list[float]:
    """The finite values, in order (NaN and infinities dropped)."""
    return [float(v) for v in values if math.isfinite(v)]


def t975(df: float) -> float:
    """``t_{0.975, df}``: the two-sided 95% quantile of Student's t; NaN for ``df < 1``."""
    if not df >= 1:
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def summarize(values: Iterable[float]) -> Summary:
    """Mean, sample std, standard error ``s / sqrt(n)`` and ``mean ± t_{0.975, n-1} se`` of the finite values."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(xs)
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = statistics.stdev(xs)
    se = std / math.sqrt(n)
    half = t975(n - 1) * se
    return Summary(n, mean, std, se, mean - half, mean + half)


def welch_interval(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """95% Welch interval of ``mean(a) - mean(b)``; NaNs when either has fewer than two finite values.

    ``d ± t_{0.975, nu} sqrt(v_a + v_b)`` with ``v = s^2 / n`` and the Welch-Satterthwaite
    ``nu = (v_a + v_b)^2 / (v_a^2 / (n_a - 1) + v_b^2 / (n_b - 1))`` rounded down (conservative:
    ``scipy.stats.ttest_ind(equal_var=False)`` keeps the fraction and gives a slightly narrower
    interval). Two samples without spread give the point ``(d, d)``.
    """
    xa, xb = finite(a), finite(b)
    if len(xa) < 2 or len(xb) < 2:
        return math.nan, math.nan
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    d = statistics.fmean(xa) - statistics.fmean(xb)
    if va + vb == 0:
        return d, d
    nu = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = t975(max(math.floor(nu + _DF_TOLERANCE), 1)) * math.sqrt(va + vb)
    return d - half, d + half


def marks(values: Mapping[K, Sequence[float]], lower_is_better: bool = False) -> dict[K, str]:
    """Per key: ``BEST`` (best mean), ``SAME`` (not told apart from the best), or absent.

    ``values`` maps each row of one column (one setting) to its per-seed values. The best row has
    the highest mean (the lowest with ``lower_is_better``: loss, perplexity; the first on a tie);
    another row is ``SAME`` when the 95% Welch interval of its difference to the best holds 0, so
    these seeds cannot tell the two apart (never for a row with one seed: it has no interval).
    Rows without a finite mean are unmarked, and nothing is marked with fewer than two such rows.
    """
    means = {k: summarize(v).mean for k, v in values.items()}
    scored = [k for k, m in means.items() if math.isfinite(m)]
    if len(scored) < 2:
        return {}
    sign = -1.0 if lower_is_better else 1.0
    best = max(scored, key=lambda k: sign * means[k])
    out = {best: BEST}
    for k in scored:
        low, high = welch_interval(values[best], values[k])
        if k != best and low <= 0 <= high:
            out[k] = SAME
    return out
