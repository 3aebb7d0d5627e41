"""Open-set identification metrics and input validation against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from bench.eval.metrics import cmc, open_set_scores, read_tar, roc, tar_at_far, tpir_at_fpir

# Gallery subjects 10, 20, 30. Probes: 10 (mated), 20 (mated), 40 and 50 (non-mated), 30 (mated, tied).
GALLERY = np.array([10, 20, 30])
PROBES = np.array([10, 20, 40, 50, 30])
SIMILARITY = np.array([
    [0.9, 0.2, 0.1],    # mate 0.9, rank 1
    [0.3, 0.5, 0.1],    # mate 0.5, rank 1
    [0.3, 0.4, 0.35],   # non-mated, best 0.4
    [0.7, 0.1, 0.2],    # non-mated, best 0.7
    [0.1, 0.8, 0.8],    # mate 0.8 tied with a non-mate 0.8: rank 2 (a tie counts against the probe)
])


def test_open_set_split_into_mated_and_non_mated():
    summary = open_set_scores(SIMILARITY, PROBES, GALLERY)
    assert summary.num_mated == 3 and summary.num_nonmated == 2
    assert summary.mate_score.tolist() == [0.9, 0.5, 0.8]
    assert summary.best_nonmate.tolist() == [0.2, 0.3, 0.8]
    assert summary.mate_rank.tolist() == [1, 1, 2]
    assert summary.nonmated_best.tolist() == [0.4, 0.7]
    # chunking over probes gives the same summary
    chunked = open_set_scores(SIMILARITY, PROBES, GALLERY, chunk=2)
    assert chunked.mate_rank.tolist() == [1, 1, 2] and chunked.nonmated_best.tolist() == [0.4, 0.7]


def test_cmc_hand_computed():
    assert cmc(SIMILARITY, PROBES, GALLERY, ranks=(1, 2, 3)) == {1: 2 / 3, 2: 1.0, 3: 1.0}


def test_tpir_at_fpir_hand_computed():
    # non-mated best scores, descending: 0.7, 0.4. Threshold index max(floor(2 * fpir) - 1, 0):
    # fpir 0.5 -> index 0 -> 0.7: only probe 0 (0.9, rank 1) is above -> 1/3;
    # fpir 1.0 -> index 1 -> 0.4: probes 0 and 1 -> 2/3 (probe 4 is not at rank 1: tie);
    # fpir 0.1 -> index max(-1, 0) = 0 -> 0.7 -> 1/3.
    out = tpir_at_fpir(SIMILARITY, PROBES, GALLERY, fpirs=(0.5, 1.0, 0.1))
    assert out == {0.5: 1 / 3, 1.0: 2 / 3, 0.1: 1 / 3}


def test_open_set_validation():
    with pytest.raises(ValueError, match="unique"):
        cmc(SIMILARITY, PROBES, np.array([10, 10, 30]))
    with pytest.raises(ValueError, match="do not match"):
        cmc(SIMILARITY, PROBES[:3], GALLERY)
    with pytest.raises(ValueError, match="NaN"):
        cmc(np.where(SIMILARITY > 0.85, np.nan, SIMILARITY), PROBES, GALLERY)
    with pytest.raises(ValueError, match="no mated"):
        cmc(SIMILARITY, np.array([1, 2, 3, 4, 5]), GALLERY)
    with pytest.raises(ValueError, match="non-mated"):
        tpir_at_fpir(SIMILARITY[[0, 1, 4]], PROBES[[0, 1, 4]], GALLERY)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tpir_at_fpir(SIMILARITY, PROBES, GALLERY, fpirs=(0.0,))
    with pytest.raises(ValueError, match="ranks"):
        cmc(SIMILARITY, PROBES, GALLERY, ranks=(0,))


def test_roc_tie_between_genuine_and_impostor_and_both_read_offs():
    # a genuine and an impostor pair share the score 0.6: the ROC jumps diagonally through that threshold
    scores = np.array([0.9, 0.6, 0.3, 0.6, 0.2, 0.1, 0.05])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    fpr, tpr, _ = roc(scores, labels)
    points = set(zip(fpr.tolist(), tpr.tolist()))
    assert (0.0, 1 / 3) in points and (0.25, 2 / 3) in points  # no point (0, 2/3): the tie cannot be split
    assert tar_at_far(scores, labels, [0.1], mode="at_most") == {0.1: 1 / 3}
    # nearest FPR to 0.2 is 0.25, held by two points (TPR 2/3 through the tie, then 1.0): the larger wins
    assert tar_at_far(scores, labels, [0.2], mode="nearest") == {0.2: 1.0}
    assert read_tar(np.array([0.0, 0.5]), np.array([0.2, 0.9]), 0.25) == 0.9  # equidistant: the larger TPR


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2]), "booleans or 0/1"),
    (np.array(["a", "b", "a"]), "booleans or 0/1"),
])
def test_labels_must_be_binary(labels, message):
    with pytest.raises(ValueError, match=message):
        tar_at_far(np.array([0.1, 0.2, 0.3]), labels, [0.1])


def test_fars_validated():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tar_at_far(np.array([0.1, 0.2]), np.array([0, 1]), [1.5])
    with pytest.raises(ValueError, match="at least one"):
        tar_at_far(np.array([0.1, 0.2]), np.array([0, 1]), [])
