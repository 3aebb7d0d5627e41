"""The statistics of a reproduction: intervals over seeds, equivalence tests, verdicts, bootstrap intervals.

A leaf (numpy and scipy only), used by the report's tables and by the claims' judge (:mod:`bench.repro`).

- :func:`t_interval`: the mean of ``n`` values with its two-sided confidence interval from Student's t
  (``mean +/- t_{1-a/2, n-1} * sd / sqrt(n)``, ``sd`` the sample std). Applied to the paired differences
  ``d_k = A_k - B_k`` of two arms over seeds ``k`` it is the paired t-interval.
- :func:`tost_p_value`: the two one-sided tests of equivalence within ``+/- eps`` (Schuirmann 1987): the
  larger of the p-values of ``H0: mean <= -eps`` and ``H0: mean >= +eps``.
- :func:`verdict`: "reproduced", "contradicted" or "inconclusive" from the 95 % interval (README, "What the
  claims show"); :func:`seeds_needed`: the number of seeds at which an interval of the observed spread
  would decide.
- :func:`bootstrap_interval`: a percentile bootstrap interval of a mean (``scipy.stats.bootstrap``), for
  one seed's uncertainty over the 10 folds of a verification protocol.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Confidence level of every interval FaceBench reports.
CONFIDENCE = 0.95
#: Relations a claim can state between arm A and arm B.
RELATIONS = ("better", "equivalent")
VERDICTS = ("reproduced", "contradicted", "inconclusive")


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their sample std and the two-sided ``confidence`` interval (NaN for n < 2)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float = CONFIDENCE


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` and its Student-t interval; with one value the spread and interval are NaN,
    with none the mean is NaN too."""
    data = np.asarray(values, dtype=float)
    n = int(data.size)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, confidence)
    mean = float(data.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan, confidence)
    sd = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, confidence)


def tost_p_value(differences: Sequence[float], eps: float) -> float:
    """p-value of the two one-sided t-tests that the mean of ``differences`` lies within ``(-eps, eps)``:
    ``max(P(T >= (mean + eps) / se), P(T <= (mean - eps) / se))`` with ``n - 1`` degrees of freedom.
    NaN with fewer than two values; with zero spread, 0 inside the band and 1 outside."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    data = np.asarray(differences, dtype=float)
    if data.size < 2:
        return math.nan
    mean, sd = float(data.mean()), float(data.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal values, up to the rounding of their mean
        return 0.0 if -eps < mean < eps else 1.0
    se, df = sd / math.sqrt(data.size), data.size - 1
    p_lower = float(stats.t.sf((mean + eps) / se, df))   # H0: mean <= -eps
    p_upper = float(stats.t.cdf((mean - eps) / se, df))  # H0: mean >= +eps
    return max(p_lower, p_upper)


def verdict(interval: Interval, relation: str, eps: float | None = None) -> str:
    """The verdict on "A better than B" or "A equivalent to B within +/- eps" from the interval of the
    paired differences A - B (higher is better):

    - better: **reproduced** when the interval lies above 0, **contradicted** when it lies below 0;
    - equivalent: **reproduced** when it lies inside ``(-eps, eps)`` (the TOST at ``(1 - confidence) / 2``
      per side), **contradicted** when it lies entirely outside the band (above ``eps`` or below ``-eps``);
    - else, and with fewer than two seeds, **inconclusive**.
    """
    _check_relation(relation, eps)
    low, high = interval.low, interval.high
    if interval.n < 2 or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if relation == "better":
        return "reproduced" if low > 0 else "contradicted" if high < 0 else "inconclusive"
    assert eps is not None
    if -eps < low and high < eps:
        return "reproduced"
    return "contradicted" if low > eps or high < -eps else "inconclusive"


def seeds_needed(mean: float, sd: float, relation: str, eps: float | None = None,
                 confidence: float = CONFIDENCE, max_n: int = 1000) -> int | None:
    """The smallest ``n >= 2`` at which an interval ``mean +/- t_{n-1} sd / sqrt(n)`` would give a verdict
    other than inconclusive (the observed mean and spread taken as true); None when no ``n <= max_n``
    does (for example a mean difference of exactly 0 on a "better" claim)."""
    _check_relation(relation, eps)
    if math.isnan(mean) or math.isnan(sd):
        return None
    if relation == "better":
        margin = abs(mean)
    else:
        assert eps is not None
        margin = eps - abs(mean) if abs(mean) < eps else abs(mean) - eps
    if margin <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) < margin:
            return n
    return None


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = 9999,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``, a fixed seed so
    that a report is reproducible); NaNs with fewer than two values."""
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _check_relation(relation: str, eps: float | None) -> None:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
    if relation == "equivalent" and (eps is None or eps <= 0):
        raise ValueError(f"an equivalence needs eps > 0, got {eps}")


def spearman_interval(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE,
                      resamples: int = 9999, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho of paired ``x``, ``y`` (:func:`scipy.stats.spearmanr`) and its percentile bootstrap
    interval over resampled pairs (``scipy.stats.bootstrap``, ``paired=True``, a fixed seed). NaNs with fewer
    than three pairs or a constant input."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {a.shape} and {b.shape}")
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan, math.nan, math.nan
    rho = float(stats.spearmanr(a, b).statistic)

    def statistic(first: np.ndarray, second: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            value = stats.spearmanr(first, second).statistic
        return 0.0 if np.isnan(value) else float(value)   # a resample with a constant side carries no rank order

    result = stats.bootstrap((a, b), statistic, paired=True, vectorized=False, confidence_level=confidence,
                             n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))
    return rho, float(result.confidence_interval.low), float(result.confidence_interval.high)
