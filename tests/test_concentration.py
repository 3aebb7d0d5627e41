"""The concentration experiment's statistics (bench/repro/concentration.py, bench/stats.spearman_interval):
the trend verdict against hand-built runs, and the interval against scipy directly."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bench.repro.concentration import experiment_overrides, markdown, summarise
from bench.stats import spearman_interval


def _rows(pairs):
    return [{"strength": s, "seed": k, "concentration": c, "accuracy": a} for s, k, c, a in pairs]


def test_spearman_interval_is_the_rank_correlation_with_a_paired_bootstrap():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    y = [1.0, 2.0, 1.5, 3.0, 2.5, 4.0, 3.5, 5.0]
    rho, low, high = spearman_interval(x, y, resamples=999)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert low <= rho <= high and 0 < low
    # pairs are resampled together: a perfect monotone relation stays at 1 in every resample
    assert spearman_interval(x, [2 * v for v in x], resamples=199) == pytest.approx((1.0, 1.0, 1.0))
    assert all(np.isnan(v) for v in spearman_interval([1, 2], [3, 4]))


@pytest.mark.parametrize("sign, expected", [(1, "reproduced"), (-1, "contradicted")])
def test_trend_verdict_follows_the_interval(sign, expected):
    rows = _rows([(s, k, 0.1 * i, 0.6 + sign * 0.01 * i) for i, (s, k) in
                  enumerate([(s, k) for s in (0.25, 0.5, 0.75, 1.0) for k in range(3)])])
    summary = summarise(rows, resamples=999)
    assert summary["verdict"] == expected and summary["rho"] == pytest.approx(sign * 1.0)
    assert summary["per_strength"]["0.25"]["accuracy_mean"] == pytest.approx(
        np.mean([r["accuracy"] for r in rows if r["strength"] == 0.25]))
    assert "**" + expected + "**" in markdown(summary, rows)


def test_no_trend_is_inconclusive():
    rng = np.random.default_rng(1)
    rows = _rows([(s, k, float(rng.random()), float(rng.random())) for s in (0.25, 0.5) for k in range(3)])
    assert summarise(rows, resamples=999)["verdict"] == "inconclusive"


def test_each_run_measures_its_own_augmentation_and_pairs_the_split():
    overrides = experiment_overrides(0.75, 2)
    assert overrides["method_params.infonce.strength"] == overrides["eval.geometry_strength"] == 0.75
    assert overrides["train.seed"] == overrides["data.split.seed"] == 2
