"""The statistics of a reproduction (:mod:`bench.stats`) against independent references.

Shows: :func:`t_interval` equals a hand-computed example and ``scipy.stats.ttest_1samp(...).confidence_interval``;
:func:`tost_p_value` equals the larger p-value of two one-sided ``ttest_1samp`` calls, and 0 / 1 with zero
spread inside / outside the band; :func:`verdict` gives each of its three verdicts for both relations on
hand-built intervals; :func:`seeds_needed` equals a brute-force search written here; :func:`bootstrap_interval`
equals ``scipy.stats.bootstrap`` with the same arguments; bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bench.stats import Interval, bootstrap_interval, seeds_needed, t_interval, tost_p_value, verdict

#: Paired differences of five seeds (mean 0.08, sample std 0.1891...).
DIFFERENCES = [0.1, -0.2, 0.3, 0.05, 0.15]
NAN = math.nan


def test_t_interval_matches_a_hand_computed_example():
    """Catches: a population instead of a sample std, a z instead of a t quantile, the wrong degrees of freedom,
    or the sd where the standard error belongs."""
    interval = t_interval([1, 2, 3, 4])
    sd = math.sqrt(5 / 3)                   # sum of squared deviations 5, over n - 1 = 3
    half = 3.182446305284263 * sd / 2       # t_{0.975, 3} * sd / sqrt(4)
    assert (interval.n, interval.confidence) == (4, 0.95)
    assert interval.mean == pytest.approx(2.5) and interval.sd == pytest.approx(sd)
    assert interval.low == pytest.approx(2.5 - half) and interval.high == pytest.approx(2.5 + half)


def test_t_interval_matches_scipy_ttest_1samp():
    """Catches: a t interval that disagrees with scipy's one-sample t confidence interval, at 95 % or another level."""
    values = np.random.default_rng(3).normal(0.8, 0.02, size=7)
    for confidence in (0.95, 0.9):
        reference = stats.ttest_1samp(values, popmean=0).confidence_interval(confidence)
        interval = t_interval(values, confidence)
        assert interval.low == pytest.approx(reference.low) and interval.high == pytest.approx(reference.high)


def test_t_interval_of_fewer_than_two_values_is_nan():
    """Catches: a zero-width interval (or an exception) for one seed, which would read as certainty."""
    one = t_interval([0.7])
    assert one.n == 1 and one.mean == 0.7 and all(math.isnan(x) for x in (one.sd, one.low, one.high))
    none = t_interval([])
    assert none.n == 0 and all(math.isnan(x) for x in (none.mean, none.sd, none.low, none.high))


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_tost_p_value_is_the_larger_of_two_one_sided_t_tests(eps):
    """Catches: a swapped tail, a two-sided p-value in place of a one-sided one, or the min of the two tests."""
    lower = stats.ttest_1samp(DIFFERENCES, popmean=-eps, alternative="greater").pvalue  # H0: mean <= -eps
    upper = stats.ttest_1samp(DIFFERENCES, popmean=eps, alternative="less").pvalue      # H0: mean >= +eps
    assert tost_p_value(DIFFERENCES, eps) == pytest.approx(max(lower, upper))


def test_tost_p_value_hand_cases():
    """Catches: a division by a zero spread, or an answer for a single seed."""
    # 0.25 is exact in binary, so the sample std is exactly 0 (three 0.2s leave a spread of ~1e-17)
    assert tost_p_value([0.25, 0.25, 0.25], eps=0.5) == 0.0   # no spread, inside the band
    assert tost_p_value([0.25, 0.25, 0.25], eps=0.1) == 1.0   # no spread, outside the band
    assert math.isnan(tost_p_value([0.2], eps=0.5))
    with pytest.raises(ValueError):
        tost_p_value(DIFFERENCES, eps=0)


ABOVE = Interval(5, 1.0, 0.5, 0.4, 1.6)
BELOW = Interval(5, -1.0, 0.5, -1.6, -0.4)
STRADDLING = Interval(5, 0.1, 0.5, -0.5, 0.7)
ONE_SEED = Interval(1, 1.0, NAN, NAN, NAN)


@pytest.mark.parametrize(("interval", "relation", "eps", "expected"), [
    (ABOVE, "better", None, "reproduced"),
    (BELOW, "better", None, "contradicted"),
    (STRADDLING, "better", None, "inconclusive"),
    (ONE_SEED, "better", None, "inconclusive"),
    (ABOVE, "equivalent", 2.0, "reproduced"),       # (0.4, 1.6) inside (-2, 2)
    (ABOVE, "equivalent", 0.3, "contradicted"),     # entirely above +0.3
    (BELOW, "equivalent", 0.3, "contradicted"),     # entirely below -0.3
    (STRADDLING, "equivalent", 0.6, "inconclusive"),  # high 0.7 crosses +0.6
    (ONE_SEED, "equivalent", 2.0, "inconclusive"),
])
def test_verdict_on_hand_built_intervals(interval, relation, eps, expected):
    """Catches: a verdict from the mean instead of the interval's ends, a swapped comparison, or a verdict
    from one seed."""
    assert verdict(interval, relation, eps) == expected


def _seeds_by_search(mean: float, sd: float, relation: str, eps: float | None = None) -> int | None:
    """The first n in 2..1000 whose interval ``mean +/- t_{0.975, n-1} sd / sqrt(n)`` decides the claim."""
    for n in range(2, 1001):
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        if relation == "better":
            decided = low > 0 or high < 0
        else:
            assert eps is not None
            decided = (-eps < low and high < eps) or low > eps or high < -eps
        if decided:
            return n
    return None


@pytest.mark.parametrize(("mean", "sd", "relation", "eps"), [
    (1.0, 2.0, "better", None), (0.3, 1.0, "better", None), (-0.5, 0.7, "better", None),
    (0.1, 0.5, "equivalent", 0.5), (0.9, 1.0, "equivalent", 0.5), (-0.2, 0.3, "equivalent", 0.4),
])
def test_seeds_needed_matches_a_brute_force_search(mean, sd, relation, eps):
    """Catches: an off-by-one in n, the wrong margin (distance to 0 or to the band's edge), or a z quantile."""
    expected = _seeds_by_search(mean, sd, relation, eps)
    assert expected is not None and seeds_needed(mean, sd, relation, eps) == expected


def test_seeds_needed_edge_cases():
    """Catches: a search that never ends, or a number of seeds where none would decide."""
    assert seeds_needed(0.0, 1.0, "better") is None              # no number of seeds decides a zero difference
    assert seeds_needed(0.5, 1.0, "equivalent", 0.5) is None     # a mean on the band's edge
    assert seeds_needed(NAN, 1.0, "better") is None
    assert seeds_needed(0.5, 0.0, "better") == 2                 # no spread: two seeds decide


def test_bootstrap_interval_matches_scipy_bootstrap():
    """Catches: another method, level, number of resamples or seed than documented (a report would not be
    reproducible, or not the percentile bootstrap the table note names)."""
    folds = np.random.default_rng(5).uniform(0.85, 0.9, size=10)
    reference = stats.bootstrap((folds,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                                random_state=np.random.default_rng(0)).confidence_interval
    assert bootstrap_interval(folds) == (pytest.approx(reference.low), pytest.approx(reference.high))
    assert bootstrap_interval(folds) == bootstrap_interval(folds)   # fixed seed: the same every time


def test_bootstrap_interval_degenerate_cases():
    """Catches: an interval for one value, or scipy's degenerate-sample failure on folds that all agree."""
    assert all(math.isnan(x) for x in bootstrap_interval([0.9]))
    assert bootstrap_interval([0.9] * 10) == (0.9, 0.9)


@pytest.mark.parametrize(("relation", "eps"), [("worse", None), ("equivalent", None), ("equivalent", 0.0)])
def test_bad_arguments_raise_value_error(relation, eps):
    """Catches: an unknown relation or an equivalence without a band silently judged (as inconclusive or worse)."""
    with pytest.raises(ValueError):
        verdict(ABOVE, relation, eps)
    with pytest.raises(ValueError):
        seeds_needed(1.0, 0.5, relation, eps)
