"""The benchmark's statistics: percentiles, medians, summaries and ratios."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks import stats


def test_percentile_interpolates_between_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert stats.percentile(values, 0) == 10.0
    assert stats.percentile(values, 100) == 40.0
    assert stats.percentile(values, 50) == pytest.approx(25.0)
    # rank (4 - 1) * 0.95 = 2.85: 30 + 0.85 * 10
    assert stats.percentile(values, 95) == pytest.approx(38.5)


def test_percentile_ignores_input_order_and_handles_one_value() -> None:
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats.percentile([7.5], 95) == 7.5


def test_percentile_matches_the_sorted_rank_rule_on_random_data() -> None:
    rng = random.Random(4)
    data = [rng.uniform(0, 100) for _ in range(101)]
    ordered = sorted(data)
    for q in (0, 10, 50, 90, 95, 100):
        # 101 values: every whole percentile falls exactly on a rank
        assert stats.percentile(data, q) == pytest.approx(ordered[q])


@pytest.mark.parametrize("q", [-1.0, 100.5, math.nan])
def test_percentile_rejects_bad_q(q: float) -> None:
    with pytest.raises(ValueError):
        stats.percentile([1.0], q)


def test_no_values_is_an_error_not_a_zero() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_median_odd_and_even() -> None:
    assert stats.median([5.0, 1.0, 3.0]) == 3.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_summary() -> None:
    s = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s.n, s.p50, s.max) == (5, 3.0, 100.0)
    assert s.mean == pytest.approx(22.0)
    assert s.p95 == pytest.approx(4.0 + 0.8 * 96.0)
    assert s.as_dict() == {"n": 5.0, "p50": 3.0, "p95": s.p95, "max": 100.0, "mean": s.mean}


def test_ratio_and_its_zero_denominator() -> None:
    assert stats.ratio(1.1, 1.0) == pytest.approx(1.1)
    assert math.isnan(stats.ratio(1.0, 0.0))


def test_median_of_dicts_is_keywise() -> None:
    rounds = [{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 30.0}, {"a": 2.0}]
    assert stats.median_of_dicts(rounds) == {"a": 2.0, "b": 20.0}


def test_ratio_line_format() -> None:
    assert stats.format_ratio("sequential", 1.0634) == "ratio thinloop/raw (sequential): 1.06"
    assert stats.format_ratio("sequential", math.nan) == "ratio thinloop/raw (sequential): n/a"
