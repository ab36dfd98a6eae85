"""Statistics over seeds: mean, 95 % confidence interval (Student's t), and Welch's t-test of a
variant against the baseline (unequal variances; `scipy.stats.ttest_ind(equal_var=False)`).

With one seed there is no interval and no test (None). When both samples have no spread (every
seed gave the same figure, as an accuracy of exactly 1.0 does) the t statistic is undefined; the
p-value is then 1.0 if the two constants are equal and 0.0 if they differ, and `degenerate` says so.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_ci95(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """(mean, half-width of the 95 % interval) of a sample; the half-width is None for n < 2."""
    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, None
    sem = float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, float(scipy_stats.t.ppf(0.975, len(x) - 1) * sem)


def welch_p(a: Sequence[float], b: Sequence[float]) -> tuple[Optional[float], bool]:
    """(two-sided p-value of Welch's t-test that a and b have the same mean, degenerate?)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None, False
    if a.std() == 0 and b.std() == 0:
        return (1.0 if a[0] == b[0] else 0.0), True
    return float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue), False


def summarise(samples: dict[str, dict[str, list[float]]], baseline: str,
              compare: Optional[dict[str, str]] = None) -> dict:
    """{variant: {metric: {"mean", "ci95", "n", "p_value"[, "degenerate"]}}} from per-seed samples
    {variant: {metric: [value per seed]}}; p-values against the samples of the metric of the
    variant's reference: `compare[variant]` when given, else the baseline."""
    out: dict[str, dict] = {}
    compare = compare or {}
    for variant, metrics in samples.items():
        out[variant] = {}
        reference = compare.get(variant, baseline)
        for metric, values in metrics.items():
            mean, ci = mean_ci95(values)
            entry = {"mean": mean, "ci95": ci, "n": len(values), "p_value": None}
            base = samples.get(reference, {}).get(metric)
            if variant != reference and base:
                entry["p_value"], degenerate = welch_p(values, base)
                if degenerate:
                    entry["degenerate"] = True
            out[variant][metric] = entry
    return out
