"""The concentration experiment as the registry's trend claim (bench/repro/claims.py ``trend``,
bench/repro/judge.py ``judge_trend``, bench/repro/concentration.py): the rank-correlation interval against
scipy, the trend verdicts on fabricated records whose ranks are set by hand, the runs a trend claim plans,
and the shipped claim's setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from bench.records import complete_runs_by_fingerprint
from bench.report.claims import TREND_NOTE, claims_markdown
from bench.repro.claims import CLAIMS_DIR, load_claims, run_fingerprint, select_claims, trend_config
from bench.repro.concentration import markdown, per_level
from bench.repro.judge import judge, judge_trend, trend_verdict
from bench.repro.reproduce import plan
from bench.stats import spearman_interval
from methods.registry import ConfigError

TREND = """
paper: {key: test, citation: "A. Author, A trend paper, 2026"}
claims:
  - id: lr-trend
    claim: "Accuracy increases with the margin."
    where: "Sec. 1"
    metric: synth-lfw acc
    relation: increases
    set: {train.budget: 1000, eval.protocols: [synth-lfw, synth-geometry]}
    trend:
      method: arcface
      x: synth-geometry concentration sigma@0.8
      levels:
        - {method_params.arcface.m: 0.3}
        - {method_params.arcface.m: 0.4}
        - {method_params.arcface.m: 0.5}
"""


@pytest.fixture()
def trend_claim(tmp_path: Path):
    directory = tmp_path / "claims"
    directory.mkdir()
    (directory / "trend.yaml").write_text(TREND)
    return load_claims(directory)[0]


def _write_run(results: Path, claim, level: int, seed: int, x: float, y: float) -> None:  # noqa: ANN001
    """A complete record of (level, seed) as bench run writes it, with the two judged columns."""
    config = trend_config(claim, level, seed, out=str(results))
    resolved = config.for_method(config.methods[0]).resolved()
    name = f"2026-{level}-{seed}"
    directory = results / name
    directory.mkdir(parents=True)
    record = {**resolved.to_dict(), "method": config.methods[0], "run_id": name, "group": "g",
              "config_fingerprint": resolved.fingerprint()}
    (directory / "config.yaml").write_text(yaml.safe_dump(record))
    for file in ("env.json", "data.json", "perf.json"):
        (directory / file).write_text("{}")
    (directory / "train.jsonl").write_text("")
    (directory / "metrics.json").write_text(json.dumps({
        "synth-lfw": {"accuracy": y, "accuracy_std": 0.01},
        "synth-geometry": {"summary": {"concentration sigma@0.8": x}}}))


def test_spearman_interval_is_the_rank_correlation_with_a_paired_bootstrap():
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    y = [1.0, 2.0, 1.5, 3.0, 2.5, 4.0, 3.5, 5.0]
    rho, low, high = spearman_interval(x, y, resamples=999)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic)
    assert low <= rho <= high and 0 < low
    # pairs are resampled together: a perfect monotone relation stays at 1 in every resample
    assert spearman_interval(x, [2 * v for v in x], resamples=199) == pytest.approx((1.0, 1.0, 1.0))
    assert all(np.isnan(v) for v in spearman_interval([1, 2], [3, 4]))


def test_trend_verdict_follows_the_interval():
    assert trend_verdict(0.1, 0.9) == "reproduced"
    assert trend_verdict(-0.9, -0.1) == "contradicted"
    assert trend_verdict(-0.2, 0.6) == "inconclusive"
    assert trend_verdict(math.nan, math.nan) == "inconclusive"


@pytest.mark.parametrize("sign, expected", [(1, "reproduced"), (-1, "contradicted")])
def test_judge_trend_on_fabricated_runs(tmp_path: Path, trend_claim, sign, expected):  # noqa: ANN001
    """Catches: a rho over the wrong columns or runs, a verdict of the wrong sign, lost runs."""
    results = tmp_path / "results"
    for level in range(3):
        for seed in range(3):
            step = 3 * level + seed  # x and y in the same (sign 1) or opposite (sign -1) rank order
            _write_run(results, trend_claim, level, seed, x=0.5 + 0.01 * step, y=0.7 + sign * 0.01 * step)
    row, points = judge_trend(trend_claim, 3, complete_runs_by_fingerprint(results), str(results))
    assert row.verdict == expected and row.n == 9 and row.mean_difference == pytest.approx(sign * 1.0)
    assert row.trend_x == "synth-geometry concentration sigma@0.8" and not row.missing
    assert sorted((p["level"], p["seed"]) for p in points) == [(lv, s) for lv in range(3) for s in range(3)]
    levels = per_level(points)
    assert [entry["label"] for entry in levels] == ["m=0.3", "m=0.4", "m=0.5"]
    assert levels[0]["y_mean"] == pytest.approx(0.7 + sign * 0.01)  # steps 0, 1, 2
    assert f"**{expected}**" in markdown(row, points)
    # The registry's judge gives the same row; a fourth seed nobody ran is listed as missing.
    (same,) = judge([trend_claim], 3, results)
    assert (same.verdict, same.mean_difference) == (row.verdict, row.mean_difference)
    (more,) = judge([trend_claim], 4, results)
    assert len(more.missing) == 3 and more.n == 9
    # The claims report shows rho, not points, and says how to read the row.
    text = claims_markdown([row])
    assert f"rho {sign * 1.0:+.3f} [" in text and TREND_NOTE in text and "Means: A" not in text


def test_a_trend_claim_plans_one_run_per_level_and_seed(trend_claim):  # noqa: ANN001
    runs = plan([trend_claim], seeds=2, out="results/x")
    assert len(runs) == 6 and len({r.fingerprint for r in runs}) == 6
    margins = sorted((r.config.method_params["arcface"]["m"], r.config.train.seed) for r in runs)
    assert margins == [(m, s) for m in (0.3, 0.4, 0.5) for s in (0, 1)]
    assert all(r.config.train.budget == 1000 and r.config.data.split.seed == r.config.train.seed for r in runs)


def test_trend_claims_are_validated(tmp_path: Path):
    bad = {"too few levels": TREND.replace("        - {method_params.arcface.m: 0.5}\n", ""),
           "arms": TREND.replace("    trend:\n", "    a: {method: arcface}\n    trend:\n"),
           "no trend": TREND.split("    trend:")[0]}
    messages = {"too few levels": "at least 3", "arms": "not arms", "no trend": "goes with a 'trend'"}
    for name, text in bad.items():
        directory = tmp_path / name.replace(" ", "-")
        directory.mkdir()
        (directory / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=messages[name]):
            load_claims(directory)


def test_shipped_claim_measures_each_runs_own_augmentation_and_pairs_the_split():
    (claim,) = select_claims(load_claims(CLAIMS_DIR), ["ssl-concentration"])
    assert claim.trend is not None and len(claim.trend.levels) >= 4
    for level in range(len(claim.trend.levels)):
        config = trend_config(claim, level, 2)
        assert config.method_params["infonce"]["strength"] == config.eval.geometry_strength
        assert config.train.seed == config.data.split.seed == 2
        assert "synth-geometry" in config.eval.protocols and "synth-lfw" in config.eval.protocols
    fingerprints = {run_fingerprint(trend_config(claim, level, 0)) for level in range(len(claim.trend.levels))}
    assert len(fingerprints) == len(claim.trend.levels)
