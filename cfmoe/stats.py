"""Intervals for the study's numbers: Student-t over seeds, percentile bootstrap over samples or repeats.

    mean, low, high = mean_interval([0.41, 0.39, 0.43])              # 3 seeds, 95% t-interval
    value, low, high = bootstrap_interval(per_entry_ecr, np.mean)    # 95% percentile bootstrap
    summary = summarize(runs, by=["run"], columns=["test_ecr", "test_ppl"])
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEVEL = 0.95
BOOTSTRAP_SAMPLES = 2000


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t cumulative distribution function."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile (bisection on `t_cdf`); t_quantile(0.975, 2) = 4.303."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and its two-sided Student-t interval (over seeds); (x, nan, nan) for a single value."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def bootstrap_interval(samples, statistic=np.mean, level: float = LEVEL, n: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[float, float, float]:
    """`statistic(samples)` and its percentile-bootstrap interval (resampling the first axis, seeded).

    `samples` may be a tuple of arrays of equal length resampled together (paired): `statistic(*resampled)`.
    """
    arrays = samples if isinstance(samples, tuple) else (samples,)
    arrays = tuple(np.asarray(a) for a in arrays)
    size = len(arrays[0])
    if any(len(a) != size for a in arrays):
        raise ValueError(f"paired samples must have equal lengths, got {[len(a) for a in arrays]}")
    value = float(statistic(*arrays))
    if size < 2:
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, size, size=(n, size))
    draws = np.array([statistic(*(a[i] for a in arrays)) for i in idx], dtype=float)
    low, high = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return value, float(low), float(high)


def summarize(table: pd.DataFrame, by: list[str], columns: list[str], level: float = LEVEL) -> pd.DataFrame:
    """One row per group: `n` and, per column, its mean with a Student-t interval (`<col>_low`, `<col>_high`)."""
    rows = []
    for key, group in table.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), n=len(group))
        for col in columns:
            row[col], row[f"{col}_low"], row[f"{col}_high"] = mean_interval(group[col], level)
        rows.append(row)
    return pd.DataFrame(rows)


def format_interval(value: tuple[float, float, float], spec: str) -> str:
    """(mean, low, high) as 'mean [low, high]', or the mean alone when it has no interval."""
    mean, low, high = value
    return f"{mean:{spec}}" if math.isnan(low) else f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]"


def clears(low: float, high: float, bar: float, above: bool = True) -> bool:
    """Whether an interval clears a bar: wholly above it (`above`) or wholly below it."""
    return bool(low > bar) if above else bool(high < bar)
