"""Verification metrics exactly as the community computes them.

- :func:`kfold_accuracy`: insightface's LFW-style accuracy (recognition/arcface_torch/eval/verification.py,
  ``calculate_roc``): squared L2 distances of unit embeddings, thresholds ``0, 0.01, ..., 3.99``,
  10 contiguous folds (``KFold(n_splits=10, shuffle=False)``), a pair is "same" when ``dist < threshold``;
  for each fold the first threshold of best accuracy on the other 9 folds is applied to the held-out
  fold; reported: mean and population standard deviation (``np.std``) of the 10 held-out accuracies.
- :func:`tar_at_far`: TAR at target FARs read off scikit-learn's ROC curve. ``mode="nearest"`` is
  insightface's eval_ijbc read-off: the ROC point whose FPR is nearest the target, ties going to the
  larger TPR. ``mode="at_most"`` is the stricter largest TPR with FPR <= target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

#: insightface's threshold grid on squared L2 distance (np.arange(0, 4, 0.01)).
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)
INSIGHTFACE_FOLDS = 10


def _validate_pairs(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels)
    if values.ndim != 1 or labels.ndim != 1 or values.shape != labels.shape:
        raise ValueError(f"{what} and labels must be 1-D arrays of equal length, got {values.shape} and {labels.shape}")
    if values.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("labels hold only one class; verification needs both genuine and impostor pairs")
    return values, labels


@dataclass
class KFoldAccuracy:
    mean: float
    std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray


def _accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict_same = dist < threshold
    return float(np.count_nonzero(predict_same == issame)) / dist.shape[0]


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = INSIGHTFACE_THRESHOLDS,
                   n_folds: int = INSIGHTFACE_FOLDS) -> KFoldAccuracy:
    """insightface's k-fold verification accuracy over squared-L2 distances (see module docstring)."""
    dist, issame = _validate_pairs(dist, issame, "dist")
    if dist.shape[0] < n_folds:
        raise ValueError(f"need at least {n_folds} pairs for {n_folds} folds, got {dist.shape[0]}")
    accuracies, chosen = np.zeros(n_folds), np.zeros(n_folds)
    for fold, (train, test) in enumerate(KFold(n_splits=n_folds, shuffle=False).split(dist)):
        train_acc = np.array([_accuracy(t, dist[train], issame[train]) for t in thresholds])
        best = int(np.argmax(train_acc))  # argmax returns the first best threshold, as insightface
        chosen[fold] = thresholds[best]
        accuracies[fold] = _accuracy(thresholds[best], dist[test], issame[test])
    return KFoldAccuracy(float(accuracies.mean()), float(accuracies.std()), accuracies, chosen)


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of scikit-learn's ``roc_curve``; higher score means "same"."""
    scores, labels = _validate_pairs(scores, labels, "scores")
    return roc_curve(labels, scores)


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float],
               mode: str = "nearest") -> dict[float, float]:
    """TAR at each target FAR (see module docstring for the two read-off rules)."""
    if mode not in ("nearest", "at_most"):
        raise ValueError(f"mode must be 'nearest' or 'at_most', got {mode!r}")
    fpr, tpr, _ = roc(scores, labels)
    out: dict[float, float] = {}
    for far in fars:
        if mode == "nearest":
            # insightface flips the curve so that, among equally near points, the first is the larger TPR.
            fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]
            out[far] = float(tpr_desc[int(np.argmin(np.abs(fpr_desc - far)))])
        else:
            allowed = fpr <= far
            out[far] = float(tpr[allowed].max()) if allowed.any() else 0.0
    return out
