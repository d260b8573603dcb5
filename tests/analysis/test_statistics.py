"""Oracle tests of the seed statistics (pf2lora_core/analysis/statistics.py) against hand-computed values.

Quantiles of Student's t are the printed two-sided 95% table values (3 decimals); every other
expected number is worked out by hand in the comments beside it.
"""

from __future__ import annotations

import math

import pytest
from scipy import stats

from pf2lora_core.analysis.statistics import BEST, SAME, marks, summarize, t975, welch_interval

# t_{0.975, df} from a printed t-table (df = inf: the normal's 1.960)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 10: 2.228, 30: 2.042, 120: 1.980, 10**9: 1.960}


@pytest.mark.parametrize(("df", "quantile"), T_TABLE.items())
def test_t_quantiles_match_the_printed_table(df: int, quantile: float) -> None:
    assert t975(df) == pytest.approx(quantile, abs=5e-4)


def test_t_quantile_needs_one_degree_of_freedom() -> None:
    assert math.isnan(t975(0)) and math.isnan(t975(math.nan))


def test_summary_of_four_values_by_hand() -> None:
    # mean 2.5; s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; se = sqrt(5/3) / 2 = 0.645497
    # 95% interval: 2.5 ± 3.182 x 0.645497 = 2.5 ± 2.0540 -> (0.446, 4.554)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3)) and s.se == pytest.approx(0.6454972244)
    assert (s.low, s.high) == pytest.approx((0.446, 4.554), abs=1e-3)


def test_summary_leaves_out_missing_values() -> None:
    # NaN is a seed without the number: [1, 3] remain; mean 2, s = sqrt(2), se = 1, 2 ± 12.706
    s = summarize([1.0, math.nan, 3.0])
    assert (s.n, s.mean, s.std, s.se) == pytest.approx((2, 2.0, math.sqrt(2.0), 1.0))
    assert (s.low, s.high) == pytest.approx((-10.706, 14.706), abs=1e-3)


def test_summary_of_one_value_and_of_none() -> None:
    one = summarize([0.5])
    assert (one.n, one.mean) == (1, 0.5) and all(math.isnan(v) for v in (one.std, one.se, one.low, one.high))
    none = summarize([math.nan])
    assert none.n == 0 and math.isnan(none.mean)


def test_summary_without_spread_is_a_point() -> None:
    s = summarize([0.55, 0.55])
    assert (s.std, s.se, s.low, s.high) == (0.0, 0.0, 0.55, 0.55)


def test_summary_agrees_with_scipy() -> None:
    values = [0.61, 0.64, 0.70]
    s = summarize(values)
    assert s.se == pytest.approx(stats.sem(values))
    assert (s.low, s.high) == pytest.approx(stats.t.interval(0.95, 2, loc=s.mean, scale=s.se))


def test_welch_interval_by_hand() -> None:
    # a: mean 2, s^2 1, v_a = 1/3; b: mean 6, s^2 4, v_b = 4/3; d = -4, sqrt(v_a + v_b) = 1.290994
    # nu = (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50/17 = 2.94 -> 2 (rounded down), t = 4.303
    # -4 ± 4.303 x 1.290994 = -4 ± 5.5551 -> (-9.555, 1.555)
    assert welch_interval([1.0, 2.0, 3.0], [4.0, 6.0, 8.0]) == pytest.approx((-9.555, 1.555), abs=1e-3)


def test_welch_interval_with_whole_degrees_of_freedom_equals_scipy() -> None:
    # equal sizes and spreads: nu = 2 (n - 1) = 4 exactly, so rounding down changes nothing and
    # scipy's Welch test must give the same interval: -1 ± 2.776 x sqrt(2/3) -> (-3.267, 1.267)
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert welch_interval(a, b) == pytest.approx((ref.low, ref.high))
    assert welch_interval(a, b) == pytest.approx((-3.267, 1.267), abs=1e-3)


def test_welch_interval_edge_cases() -> None:
    assert welch_interval([1.0, 1.0], [2.0, 2.0]) == (-1.0, -1.0)  # no spread: the difference itself
    assert all(math.isnan(v) for v in welch_interval([1.0], [2.0, 3.0]))
    assert all(math.isnan(v) for v in welch_interval([1.0, math.nan], [2.0, 3.0]))  # one finite value


# Per row, per seed. a: mean 0.85, v = 0.005 / 2 = 0.0025; b: mean 0.62, v = 0.0008 / 2 = 0.0004;
# c: mean 0.105, v = 0.00005 / 2 = 0.000025; d: one seed; e: no value.
ROWS = {"a": [0.80, 0.90], "b": [0.60, 0.64], "c": [0.10, 0.11], "d": [0.5], "e": []}


def test_marks_higher_is_better() -> None:
    # a - b = 0.23, nu = 0.0029^2 / (0.0025^2 + 0.0004^2) = 1.31 -> 1, half = 12.706 x 0.05385 = 0.684:
    #   (-0.454, 0.914) holds 0 -> b is ≈
    # a - c = 0.745, nu = 1.02 -> 1, half = 12.706 x 0.05025 = 0.638: (0.107, 1.383) -> c told apart
    # d has one seed (no interval), e no value: unmarked
    assert marks(ROWS) == {"a": BEST, "b": SAME}


def test_marks_lower_is_better() -> None:
    # best: c (0.105). b - c = 0.515, nu = 1.12 -> 1, half = 12.706 x 0.02062 = 0.262: (0.253, 0.777)
    # a - c: (0.107, 1.383) as above: neither holds 0
    assert marks(ROWS, lower_is_better=True) == {"c": BEST}


def test_marks_need_two_rows_with_a_mean() -> None:
    assert marks({"a": [1.0, 2.0], "b": [math.nan], "c": []}) == {}
    assert marks({"x": [1.0, 1.0], "y": [1.0, 1.0]}) == {"x": BEST, "y": SAME}  # a tie: the first is best
    assert marks({"x": [0.5], "y": [0.7]}) == {"y": BEST}  # one seed each: a best, no ≈


def test_welch_interval_with_fractional_degrees_of_freedom_rounds_them_down() -> None:
    a, b = [0.80, 0.86, 0.83], [0.70, 0.79, 0.71, 0.74]
    va, vb = stats.tvar(a) / 3, stats.tvar(b) / 4
    nu = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    d = sum(a) / 3 - sum(b) / 4
    half = stats.t.ppf(0.975, math.floor(nu)) * math.sqrt(va + vb)
    assert nu % 1 > 0.01  # a fraction to round down
    assert welch_interval(a, b) == pytest.approx((d - half, d + half))
