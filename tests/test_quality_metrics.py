"""FIQA evaluation (bench/eval/quality_metrics.py): the FNM-EDC, its pAUC and Spearman's rho against
hand-computed values, and the properties that pin the definition (pairwise min, a threshold fixed once
from the impostors, discarding over genuine comparisons only, ties, monotone invariance)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from bench.eval.quality_metrics import EDCCurve, edc, fmr_threshold, pairwise_quality, spearman

# Ten impostor comparisons; at FMR 0.1 one may match, so the threshold is the 2nd highest score, 0.5
# (a match is a score strictly above it). The impostor at 0.5 has the lowest quality: an EDC that discarded
# impostors too and re-derived the threshold on the 9 kept ones would raise it to 0.9 at d = 0.1.
IMPOSTOR = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3])
IMPOSTOR_Q = np.array([[0.5, 0.6], [0.0, 0.9]] + [[0.5, 0.6]] * 8)
# Ten genuine comparisons: (score, quality of image a, quality of image b). False non-matches (score <= 0.5):
# rows 0, 2, 4 (0.5 is not above the threshold) and 6: FNMR(0) = 4 / 10.
GENUINE_ROWS = [
    (0.20, 0.90, 0.10),  # min 0.10, error
    (0.80, 0.20, 0.70),  # min 0.20
    (0.40, 0.30, 0.80),  # min 0.30, error
    (0.90, 0.95, 0.40),  # min 0.40
    (0.50, 0.50, 0.60),  # min 0.50, error (equal to the threshold)
    (0.70, 0.60, 0.90),  # min 0.60
    (0.30, 0.70, 0.75),  # min 0.70, error
    (0.95, 0.80, 0.85),  # min 0.80
    (0.85, 0.90, 0.99),  # min 0.90
    (0.75, 1.00, 0.95),  # min 0.95
]
GENUINE = np.array([r[0] for r in GENUINE_ROWS])
GENUINE_Q = np.array([r[1:] for r in GENUINE_ROWS])
GRID = np.round(np.arange(0, 10) / 10, 10)
# Discarding by min quality removes rows 0, 1, 2, ..., 9 in that order; kept errors / kept comparisons:
HAND_FNMR = [4 / 10, 3 / 9, 3 / 8, 2 / 7, 2 / 6, 1 / 5, 1 / 4, 0 / 3, 0 / 2, 0 / 1]


def small_curve(**kwargs) -> EDCCurve:
    return edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, fmr=0.1, discard=GRID, **kwargs)


def test_edc_matches_the_hand_computed_curve():
    curve = small_curve()
    assert curve.threshold == 0.5 and curve.fmr == 0.1
    np.testing.assert_allclose(curve.discard, GRID)
    np.testing.assert_allclose(curve.fnmr, HAND_FNMR, rtol=0, atol=1e-12)


def test_pairwise_quality_is_the_min_not_the_max():
    # With the max, the discard order would be rows 4, 1, 6, 2, ...: FNMR at d = 0.4 would be 1/6, not 2/6.
    np.testing.assert_allclose(pairwise_quality(GENUINE_Q.ravel(), np.arange(20).reshape(10, 2)),
                               [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95])
    assert small_curve().fnmr[4] == pytest.approx(2 / 6)
    assert pairwise_quality(np.array([0.3, 0.9, 0.5]), np.array([[1, 2], [0, 1]])).tolist() == [0.5, 0.3]


def test_pauc_is_the_stepwise_area_hand_computed():
    curve = small_curve()
    # [0, 0.1): 0.4, [0.1, 0.2): 1/3, [0.2, 0.3): 3/8
    assert curve.pauc(0.2) == pytest.approx(0.1 * 0.4 + 0.1 / 3)
    assert curve.pauc() == pytest.approx(0.1 * 0.4 + 0.1 / 3)          # default limit 0.2
    assert curve.pauc(0.3) == pytest.approx(0.1 * 0.4 + 0.1 / 3 + 0.1 * 3 / 8)
    assert curve.pauc(0.25) == pytest.approx(0.1 * 0.4 + 0.1 / 3 + 0.05 * 3 / 8)  # cut inside a step


def test_pauc_normalisations_hand_computed():
    curve = small_curve()
    area = 0.1 * 0.4 + 0.1 / 3 + 0.1 * 3 / 8
    flat = 0.4 * 0.3                                        # random quality: FNMR(0) throughout
    oracle = 0.1 * 0.4 + 0.1 * (0.3 / 0.9) + 0.1 * (0.2 / 0.8)  # (FNMR(0) - d) / (1 - d)
    assert curve.pauc(0.3, "initial") == pytest.approx(area / flat)
    assert curve.pauc(0.3, "oracle") == pytest.approx(area - oracle)
    assert curve.pauc(0.3, "relative") == pytest.approx((area - oracle) / (flat - oracle))
    np.testing.assert_allclose(curve.oracle()[:5], [0.4, 0.3 / 0.9, 0.2 / 0.8, 0.1 / 0.7, 0.0], atol=1e-12)


def test_threshold_is_fixed_once_from_the_impostors_only():
    assert fmr_threshold(IMPOSTOR, 0.1) == 0.5
    assert fmr_threshold(IMPOSTOR, 0.05) == 0.9                    # floor(0.5) = 0 may match: the highest
    assert fmr_threshold(IMPOSTOR, 0.29) == 0.4                    # floor(2.9) = 2 may match: the 3rd highest
    # genuine scores do not move it
    assert edc(GENUINE + 0.3, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, fmr=0.1).threshold == 0.5
    # on many impostors the FMR is the target exactly: 10 of 10,000 strictly above
    rng = np.random.default_rng(0)
    impostor = rng.normal(size=10_000)
    assert np.count_nonzero(impostor > fmr_threshold(impostor, 1e-3)) == 10


def test_impostor_qualities_do_not_change_an_fnm_edc():
    """Discarding is over the genuine comparisons only; impostors are never discarded (so the threshold is
    never re-derived on a subset of them). The hand-computed curve already fails if they were: with the
    low-quality 0.5 impostor gone, the threshold would be 0.9 and FNMR(0.1) 8/9 instead of 3/9."""
    base = small_curve()
    flipped = edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q[::-1] * -5.0, fmr=0.1, discard=GRID)
    np.testing.assert_array_equal(base.fnmr, flipped.fnmr)
    assert base.threshold == flipped.threshold


def test_oracle_quality_gives_the_ideal_curve():
    """Quality that ranks exactly the false non-matches lowest: FNMR(d) = (E - k) / (N - k), which reaches 0
    at d = FNMR(0); the oracle-normalised and relative pAUC are 0."""
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(3.5, 1.0, 1000), rng.normal(0.0, 1.0, 20_000)
    threshold = fmr_threshold(impostor, 1e-3)
    errors = genuine <= threshold
    total, start = 1000, int(errors.sum())
    quality = np.where(errors, 0.0, 1.0 + rng.random(1000))   # the errors tie at the bottom
    curve = edc(genuine, impostor, np.stack([quality, quality + 1], 1), np.ones((20_000, 2)))
    kept = np.round(curve.discard * total).astype(int)
    np.testing.assert_allclose(curve.fnmr, np.maximum(start - kept, 0) / (total - kept), atol=1e-12)
    assert curve.fnmr[0] == pytest.approx(start / total) and 0.2 < start / total < 0.5
    zero_from = -(-start // 10)                                # the first grid step with d >= FNMR(0)
    assert np.all(curve.fnmr[zero_from:] == 0) and curve.fnmr[zero_from - 1] > 0
    np.testing.assert_allclose(curve.fnmr, curve.oracle(), atol=1e-12)
    assert curve.pauc(0.2, "oracle") == pytest.approx(0.0, abs=1e-12)
    assert curve.pauc(0.2, "relative") == pytest.approx(0.0, abs=1e-12)


def test_random_quality_gives_a_flat_curve_on_average():
    rng = np.random.default_rng(2)
    genuine, impostor = rng.normal(3.5, 1.0, 1000), rng.normal(0.0, 1.0, 5000)
    curves = [edc(genuine, impostor, rng.random((1000, 2)), rng.random((5000, 2))) for _ in range(200)]
    mean = np.mean([c.fnmr for c in curves], axis=0)
    start = curves[0].fnmr[0]
    assert all(c.fnmr[0] == start for c in curves)
    np.testing.assert_allclose(mean[:51], start, atol=0.01)          # flat up to half discarded
    assert np.mean([c.pauc(0.2, "initial") for c in curves]) == pytest.approx(1.0, abs=0.02)
    assert np.mean([c.pauc(0.2, "relative") for c in curves]) == pytest.approx(1.0, abs=0.05)


def test_constant_quality_is_exactly_flat_by_the_tie_rule():
    rng = np.random.default_rng(3)
    genuine, impostor = rng.normal(3.5, 1.0, 500), rng.normal(0.0, 1.0, 5000)
    curve = edc(genuine, impostor, np.full((500, 2), 0.7), np.full((5000, 2), 0.7))
    np.testing.assert_allclose(curve.fnmr, curve.fnmr[0], atol=1e-12)


def test_ties_are_split_in_proportion_hand_computed():
    """Qualities 1, 1, 1, 2 with one error in the tied block: discarding one comparison removes the error
    with probability 1/3, so the kept FNMR is (2/3) * (1/3) = 2/9 (the mean over the tie orders)."""
    genuine = np.array([0.0, 1.0, 1.0, 1.0])                 # the first is the error (threshold 0.5)
    quality = np.array([[1.0, 1.0], [1.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    impostor = np.array([0.6, 0.5, 0.4])
    curve = edc(genuine, impostor, quality, np.zeros((3, 2)), fmr=0.34, discard=[0.0, 0.25, 0.5, 0.75])
    assert curve.threshold == 0.5
    np.testing.assert_allclose(curve.fnmr, [1 / 4, 2 / 9, (1 / 3) / 2, 0.0], atol=1e-12)
    # and the input order does not matter
    order = [3, 2, 0, 1]
    again = edc(genuine[order], impostor, quality[order], np.zeros((3, 2)), fmr=0.34, discard=[0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(again.fnmr, curve.fnmr, atol=1e-12)


def test_exactly_the_requested_fraction_is_discarded():
    # 0.29 * 100 is 28.999999999999996 in floats: still 29 discarded
    genuine = np.linspace(0.0, 1.0, 100)                      # 50 errors at or below the threshold 0.5
    quality = np.stack([np.arange(100.0)] * 2, 1)             # the lowest quality are the errors
    curve = edc(genuine, np.array([0.9, 0.5, 0.1]), quality, np.zeros((3, 2)), fmr=0.34, discard=[0.0, 0.29])
    errors = int(np.count_nonzero(genuine <= 0.5))
    assert curve.fnmr[1] == pytest.approx((errors - 29) / 71)


def test_quality_anticorrelated_with_errors_gives_a_rising_curve():
    rng = np.random.default_rng(4)
    genuine, impostor = rng.normal(3.5, 1.0, 1000), rng.normal(0.0, 1.0, 5000)
    errors = genuine <= fmr_threshold(impostor, 1e-3)
    quality = np.where(errors, 10.0 + rng.random(1000), rng.random(1000))  # errors have the best quality
    curve = edc(genuine, impostor, np.stack([quality, quality], 1), rng.random((5000, 2)))
    start = int(errors.sum())
    head = curve.discard <= 0.5
    kept = 1000 - np.round(curve.discard[head] * 1000)
    np.testing.assert_allclose(curve.fnmr[head], start / kept, atol=1e-12)
    assert np.all(np.diff(curve.fnmr[head]) > 0)
    assert curve.pauc(0.2, "initial") > 1.0


def test_invariant_to_monotone_transforms_of_quality():
    rng = np.random.default_rng(5)
    genuine, impostor = rng.normal(1.5, 1.0, 300), rng.normal(0.0, 1.0, 3000)
    quality = np.round(rng.normal(size=(300, 2)), 1)          # with ties
    base = edc(genuine, impostor, quality, np.zeros((3000, 2)))
    for transform in (lambda q: np.exp(3 * q), lambda q: q ** 3 + 7, lambda q: 100 * q - 5):
        other = edc(genuine, impostor, transform(quality), np.zeros((3000, 2)))
        np.testing.assert_allclose(other.fnmr, base.fnmr, rtol=0, atol=1e-12)


def test_default_grid_and_json_round_trip():
    curve = edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, fmr=0.1)
    assert len(curve.discard) == 96 and curve.discard[0] == 0 and curve.discard[-1] == pytest.approx(0.95)
    document = json.loads(json.dumps(curve.as_dict()))
    assert set(document) == {"discard", "fnmr", "threshold", "fmr"}
    assert document["threshold"] == 0.5 and document["fmr"] == 0.1
    again = EDCCurve.from_dict(document)
    np.testing.assert_array_equal(again.fnmr, curve.fnmr)
    assert again.pauc(0.2) == curve.pauc(0.2)
    with pytest.raises(ValueError):                          # read-only: a frozen curve
        curve.fnmr[0] = 1.0


def test_spearman():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])                   # rank differences 1, 1, 1, 1, 0
    assert spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert np.isnan(spearman(x, np.ones(5)))


@pytest.mark.parametrize("call, message", [
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q[:5], IMPOSTOR_Q), "genuine_quality_pairs"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q[:, :1]), "impostor_quality_pairs"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, fmr=0.0), "fmr"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, fmr=1.0), "fmr"),
    (lambda: edc(np.array([np.nan]), IMPOSTOR, GENUINE_Q[:1], IMPOSTOR_Q), "NaN"),
    (lambda: edc(GENUINE, IMPOSTOR[:0], GENUINE_Q, IMPOSTOR_Q[:0]), "empty"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, discard=[0.0, 0.2, 0.1]), "increasing"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, discard=[0.0, 1.0]), "[0, 1)"),
    (lambda: small_curve().pauc(0.95), "max_discard"),
    (lambda: small_curve().pauc(0.2, "area"), "normalise"),
    (lambda: edc(GENUINE, IMPOSTOR, GENUINE_Q, IMPOSTOR_Q, discard=[0.1, 0.2]).pauc(0.2), "start at discard"),
    (lambda: spearman(np.ones(3), np.ones(4)), "equal length"),
    (lambda: pairwise_quality(np.ones(3), np.array([[0, 3]])), "outside"),
])
def test_invalid_inputs_raise_one_clear_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
