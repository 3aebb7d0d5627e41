"""Protocol arithmetic against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from bench.eval.metrics import INSIGHTFACE_THRESHOLDS, kfold_accuracy, tar_at_far
from bench.eval.synth_benchmarks import lfw_style_pairs
from bench.eval.verification import verification_metrics


def test_kfold_accuracy_separable_pairs():
    # genuine pairs at distance 0.5, impostors at 1.5: any threshold in (0.5, 1.5] is perfect;
    # the first best on the grid is 0.51
    issame = np.tile([True] * 5 + [False] * 5, 10)
    dist = np.where(issame, 0.5, 1.5)
    result = kfold_accuracy(dist, issame)
    assert result.mean == 1.0 and result.std == 0.0
    assert np.allclose(result.fold_thresholds, 0.51)


def test_kfold_accuracy_hand_computed_with_one_error_per_fold():
    # each fold of 10 pairs: genuine at 0.2 (x4) and 1.9 (x1), impostors at 2.5 (x5).
    # Thresholds t in (0.2, 1.9] accept 4 of 5 genuine pairs (9/10); t in (1.9, 2.5] get all 10 right.
    # np.arange(0, 4, 0.01)[190] is 1.9000000000000001 > 1.9, so the first best threshold is grid point
    # 190 (insightface inherits this floating-point grid), and every held-out fold scores 1.0.
    fold = np.array([0.2, 0.2, 0.2, 0.2, 1.9, 2.5, 2.5, 2.5, 2.5, 2.5])
    same = np.array([True] * 5 + [False] * 5)
    result = kfold_accuracy(np.tile(fold, 10), np.tile(same, 10))
    assert INSIGHTFACE_THRESHOLDS[190] > 1.9
    assert result.mean == 1.0
    assert np.all(result.fold_thresholds == INSIGHTFACE_THRESHOLDS[190])


def test_kfold_accuracy_population_std():
    # folds 0..4 perfectly separable, folds 5..9 with one impostor closer than every genuine pair.
    folds_dist, folds_same = [], []
    for k in range(10):
        dist = np.array([0.4] * 5 + [1.6] * 5)
        if k >= 5:
            dist[5] = 0.1  # an impostor that every threshold > 0.1 accepts
        folds_dist.append(dist)
        folds_same.append(np.array([True] * 5 + [False] * 5))
    result = kfold_accuracy(np.concatenate(folds_dist), np.concatenate(folds_same))
    # every fold's chosen threshold is 0.41 (first best on the 9 others); folds 5..9 score 0.9
    expected = np.array([1.0] * 5 + [0.9] * 5)
    assert np.allclose(result.fold_accuracies, expected)
    assert result.mean == pytest.approx(0.95)
    assert result.std == pytest.approx(np.std(expected))  # population std = 0.05


def test_tar_at_far_nearest_and_at_most_with_a_tie():
    # 4 genuine, 10 impostors; scores: genuine 0.9, 0.8, 0.5 (tied with an impostor), 0.3
    genuine = [0.9, 0.8, 0.5, 0.3]
    impostor = [0.5, 0.4, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0.0]
    scores = np.array(genuine + impostor)
    labels = np.array([1] * 4 + [0] * 10)
    # ROC points (fpr, tpr): (0,0) (0,.25) (0,.5) (.1,.75) (.2,.75) (.2,1.0) (1,1) after sklearn's dropping
    tar = tar_at_far(scores, labels, [0.1, 0.2, 0.05], mode="nearest")
    assert tar[0.1] == 0.75
    assert tar[0.2] == 1.0       # two points at FPR 0.2: the larger TPR wins
    assert tar[0.05] == 0.75     # |0.1 - 0.05| == |0 - 0.05|: tie goes to the larger TPR
    strict = tar_at_far(scores, labels, [0.05, 0.1], mode="at_most")
    assert strict[0.05] == 0.5 and strict[0.1] == 0.75


def test_metrics_validate_inputs():
    with pytest.raises(ValueError, match="one class"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 1]), [0.1])
    with pytest.raises(ValueError, match="NaN"):
        kfold_accuracy(np.array([np.nan] * 20), np.array([True, False] * 10))
    with pytest.raises(ValueError, match="equal length"):
        tar_at_far(np.array([0.1, 0.2, 0.3]), np.array([1, 0]), [0.1])
    with pytest.raises(ValueError, match="mode"):
        tar_at_far(np.array([0.1, 0.2]), np.array([1, 0]), [0.1], mode="interp")


def test_verification_metrics_on_constructed_embeddings():
    # pairs of identical embeddings are genuine, orthogonal ones impostors: accuracy 1, TAR 1
    issame = np.array([True, False] * 10)
    feats = []
    for k, same in enumerate(issame):
        a = np.zeros(4); a[k % 4] = 1.0
        b = a.copy() if same else np.roll(a, 1)
        feats += [3 * a, b]  # scale does not matter: embeddings are normalised
    out = verification_metrics(np.array(feats), issame)
    assert out["accuracy"] == 1.0 and out["tar_at_far"]["0.001"] == 1.0
    assert out["num_pairs"] == 20 and out["num_genuine"] == 10


def test_lfw_style_pairs_layout():
    ids, samples, issame = lfw_style_pairs(100, seed=0)
    assert ids.shape == (12000,) and issame.shape == (6000,)
    assert issame[:300].all() and not issame[300:600].any()
    assert np.all(ids[0::2][issame] == ids[1::2][issame])
    assert np.all(ids[0::2][~issame] != ids[1::2][~issame])
    assert len(np.unique(samples)) == 12000
