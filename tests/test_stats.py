"""Intervals: Student-t quantiles against known values, coverage of the t-interval, the bootstrap, verdicts."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import claims, stats


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_interval_covers_the_mean_at_its_level():
    rng = np.random.default_rng(0)
    covered = [low <= 1.0 <= high for low, high in
               (stats.mean_interval(rng.normal(1.0, 2.0, size=3))[1:] for _ in range(4000))]
    assert 0.94 < np.mean(covered) < 0.96


def test_mean_interval_of_one_value_has_no_interval_and_ignores_nan():
    mean, low, high = stats.mean_interval([2.0])
    assert mean == 2.0 and np.isnan(low) and np.isnan(high)
    assert stats.mean_interval([1.0, np.nan, 3.0])[0] == 2.0


def test_bootstrap_is_seeded_paired_and_brackets_the_statistic():
    x = np.random.default_rng(1).normal(size=50)
    a = stats.bootstrap_interval(x, np.mean, seed=3)
    assert a == stats.bootstrap_interval(x, np.mean, seed=3)
    assert a[1] < a[0] < a[2]
    ratio = stats.bootstrap_interval((x + 10, 2 * (x + 10)), lambda u, v: v.mean() / u.mean())
    assert ratio == pytest.approx((2.0, 2.0, 2.0))  # paired resampling keeps an exact ratio exact
    with pytest.raises(ValueError, match="equal lengths"):
        stats.bootstrap_interval((x, x[:3]), lambda u, v: 0.0)


def test_summarize_gives_one_row_per_group_with_intervals():
    table = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "v": [1.0, 2.0, 3.0, 5.0, 5.0, 5.0]})
    s = stats.summarize(table, ["run"], ["v"]).set_index("run")
    assert s.loc["a", "n"] == 3 and s.loc["a", "v"] == 2.0
    assert s.loc["a", "v_low"] == pytest.approx(2 - 4.3027 / np.sqrt(3), abs=1e-3)
    assert s.loc["b", "v_low"] == s.loc["b", "v_high"] == 5.0


def test_a_target_is_met_only_when_its_interval_clears_it():
    target = claims.Target("gain", 0.35, "at_least")
    assert target.verdict_interval(0.5, 0.4, 0.6).endswith("met)")
    assert "straddles" in target.verdict_interval(0.4, 0.3, 0.5)
    assert target.verdict_interval(0.2, 0.1, 0.3).endswith("missed)")
    cost = claims.Target("cost", 0.02, "at_most")
    assert cost.clears(-0.01, 0.015) and not cost.clears(-0.01, 0.03)
