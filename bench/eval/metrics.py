"""Verification and identification metrics exactly as the community computes them.

Verification (pairs: a score or distance and a same/different label):

- :func:`kfold_accuracy`: insightface's LFW-style accuracy (recognition/arcface_torch/eval/verification.py,
  ``calculate_roc``): squared L2 distances of unit embeddings, thresholds ``0, 0.01, ..., 3.99``,
  10 contiguous folds (``KFold(n_splits=10, shuffle=False)``), a pair is "same" when ``dist < threshold``;
  for each fold the first threshold of best accuracy on the other 9 folds is applied to the held-out
  fold; reported: mean and population standard deviation (``np.std``) of the 10 held-out accuracies.
- :func:`roc`: scikit-learn's ``roc_curve`` (higher score = "same").
- :func:`compact_roc`: that ROC on a log-FAR grid of at most 100 points (stored in ``metrics.json``).
- :func:`tar_at_far`: TAR at target FARs read off that ROC. ``mode="nearest"`` is insightface's
  eval_ijbc read-off: the ROC point whose FPR is nearest the target, ties going to the larger TPR.
  ``mode="at_most"`` is the stricter largest TPR with FPR <= target.

Open-set identification (a probe x gallery similarity matrix, subject labels for both; IJB-B/C 1:N):

- a probe is *mated* when its subject is enrolled in the gallery, *non-mated* otherwise;
- :func:`cmc`: the fraction of mated probes whose mate is within the top ``r``. The mate's rank is
  ``1 + #{non-mate gallery entries scoring >= the mate}``: a tie counts against the probe, the same
  condition as the "correct at rank 1" test ``mate > max(non-mates)`` of insightface's ijb_evals.py;
- :func:`tpir_at_fpir`: insightface's ijb_evals.py (after PR #1739): the threshold is the
  ``max(floor(N_nm * fpir) - 1, 0)``-th (0-based) largest of the non-mated probes' best scores; TPIR is
  the fraction of mated probes whose mate is at rank 1 and scores above that threshold.

Both work from an :class:`OpenSetScores` summary (per mated probe: mate score, best non-mate score and
rank; per non-mated probe: best score), which :func:`open_set_scores` builds in probe chunks so a large
gallery never needs the whole probe x gallery matrix at once.

Inputs are validated: shapes, NaN or infinite values, labels that are not 0/1, a single class, FARs
outside (0, 1]; each raises ``ValueError`` with a message naming the problem.
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
TAR_READ_OFF_MODES = ("nearest", "at_most")
#: Probes scored per block in :func:`open_set_scores` (bounds the similarity block to chunk x gallery).
OPEN_SET_CHUNK = 4096


def _validate_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.isin(labels, (0, 1))):
            raise ValueError(f"{what} must be booleans or 0/1, got values such as {np.unique(labels)[:3].tolist()}")
    return labels.astype(bool)


def _validate_pairs(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values)
    labels = np.asarray(labels)
    if values.ndim != 1 or labels.ndim != 1 or values.shape != labels.shape:
        raise ValueError(f"{what} and labels must be 1-D arrays of equal length, got {values.shape} and {labels.shape}")
    if values.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values")
    labels = _validate_labels(labels)
    if labels.all() or not labels.any():
        raise ValueError("labels hold only one class; verification needs both genuine and impostor pairs")
    return values, labels


def validate_rates(rates: Sequence[float], what: str = "FAR") -> list[float]:
    """Target rates (FAR, FPIR) as floats, each in (0, 1]."""
    out = [float(rate) for rate in rates]
    if not out:
        raise ValueError(f"give at least one target {what}")
    for rate in out:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"target {what} must be in (0, 1], got {rate}")
    return out


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
    dist = dist.astype(np.float64)
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


def read_tar(fpr: np.ndarray, tpr: np.ndarray, far: float, mode: str = "nearest") -> float:
    """TAR at one target FAR from ROC points (see the module docstring for the two rules)."""
    if mode not in TAR_READ_OFF_MODES:
        raise ValueError(f"mode must be 'nearest' or 'at_most', got {mode!r}")
    if mode == "nearest":
        # insightface flips the curve so that, among equally near points, the first is the larger TPR.
        fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]
        return float(tpr_desc[int(np.argmin(np.abs(fpr_desc - far)))])
    allowed = fpr <= far
    return float(tpr[allowed].max()) if allowed.any() else 0.0


#: Points of the compact ROC stored in metrics.json (``bench report`` draws the ROC figures from it).
COMPACT_ROC_POINTS = 100


def compact_roc(fpr: np.ndarray, tpr: np.ndarray, num_impostor: int,
                points: int = COMPACT_ROC_POINTS) -> dict[str, object]:
    """The ROC on a log-spaced FAR grid from ``1 / num_impostor`` (the smallest FAR the pairs resolve) to 1.

    At each grid FAR the TAR is the largest TPR with FPR <= FAR (the ROC is a step function between its
    points); at most ``points`` points (duplicates of the smallest FARs dropped), 6 significant digits.
    """
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    lowest = 1.0 / max(int(num_impostor), 1)
    grid = np.unique(np.geomspace(lowest, 1.0, num=max(int(points), 2)))
    last = np.searchsorted(fpr, grid, side="right") - 1  # fpr is non-decreasing along the curve
    tar = np.where(last >= 0, tpr[np.clip(last, 0, None)], 0.0)
    return {"far": [float(f"{v:.6g}") for v in grid], "tar": [float(f"{v:.6g}") for v in tar],
            "rule": "log-spaced FAR grid from 1/impostors to 1; TAR = largest TPR with FPR <= FAR"}


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float],
               mode: str = "nearest") -> dict[float, float]:
    """TAR at each target FAR (see module docstring for the two read-off rules)."""
    if mode not in TAR_READ_OFF_MODES:
        raise ValueError(f"mode must be 'nearest' or 'at_most', got {mode!r}")
    fars = validate_rates(fars, "FAR")
    fpr, tpr, _ = roc(scores, labels)
    return {far: read_tar(fpr, tpr, far, mode) for far in fars}


# ----------------------------------------------------------------------------------------------------
# Open-set identification
# ----------------------------------------------------------------------------------------------------


@dataclass
class OpenSetScores:
    """What open-set metrics need from a probe x gallery similarity matrix.

    ``mate_score``, ``best_nonmate`` and ``mate_rank`` have one entry per mated probe (in probe order);
    ``nonmated_best`` one per non-mated probe (its best score over the whole gallery).
    """

    mate_score: np.ndarray
    best_nonmate: np.ndarray
    mate_rank: np.ndarray
    nonmated_best: np.ndarray

    @property
    def num_mated(self) -> int:
        return int(self.mate_score.shape[0])

    @property
    def num_nonmated(self) -> int:
        return int(self.nonmated_best.shape[0])


def _validate_open_set(similarity: np.ndarray, probe_labels: np.ndarray,
                       gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    similarity = np.asarray(similarity)
    probe_labels, gallery_labels = np.asarray(probe_labels), np.asarray(gallery_labels)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be a 2-D probe x gallery matrix, got shape {similarity.shape}")
    if probe_labels.shape != (similarity.shape[0],) or gallery_labels.shape != (similarity.shape[1],):
        raise ValueError(f"labels do not match the similarity matrix {similarity.shape}: probe labels "
                         f"{probe_labels.shape}, gallery labels {gallery_labels.shape}")
    if similarity.shape[1] < 2:
        raise ValueError(f"the gallery needs at least 2 entries, got {similarity.shape[1]}")
    if np.unique(gallery_labels).shape[0] != gallery_labels.shape[0]:
        raise ValueError("gallery labels must be unique (one gallery template per subject)")
    return similarity, probe_labels, gallery_labels


def open_set_scores(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
                    chunk: int = OPEN_SET_CHUNK) -> OpenSetScores:
    """The :class:`OpenSetScores` of a probe x gallery similarity matrix (processed ``chunk`` probes at a time)."""
    similarity, probe_labels, gallery_labels = _validate_open_set(similarity, probe_labels, gallery_labels)
    parts = [_open_set_block(similarity[start:start + chunk], probe_labels[start:start + chunk], gallery_labels)
             for start in range(0, similarity.shape[0], chunk)]
    return concat_open_set(parts)


def _open_set_block(block: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray) -> OpenSetScores:
    if not np.all(np.isfinite(block)):
        raise ValueError("similarity contains NaN or infinite values")
    order = np.argsort(gallery_labels, kind="stable")
    position = np.searchsorted(gallery_labels[order], probe_labels)
    position = np.minimum(position, gallery_labels.shape[0] - 1)
    mated = gallery_labels[order][position] == probe_labels
    mate_column = order[position[mated]]
    mated_block = block[mated]
    rows = np.arange(mated_block.shape[0])
    mate_score = mated_block[rows, mate_column]
    others = mated_block.copy()
    others[rows, mate_column] = -np.inf
    best_nonmate = others.max(axis=1) if others.shape[0] else np.zeros(0, block.dtype)
    mate_rank = 1 + np.count_nonzero(others >= mate_score[:, None], axis=1)
    nonmated_best = block[~mated].max(axis=1) if (~mated).any() else np.zeros(0, block.dtype)
    return OpenSetScores(mate_score, best_nonmate, mate_rank, nonmated_best)


def concat_open_set(parts: Sequence[OpenSetScores]) -> OpenSetScores:
    return OpenSetScores(*(np.concatenate([getattr(p, name) for p in parts])
                           for name in ("mate_score", "best_nonmate", "mate_rank", "nonmated_best")))


def cmc_from_scores(summary: OpenSetScores, ranks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    if summary.num_mated == 0:
        raise ValueError("no mated probes: no probe's subject is enrolled in the gallery")
    out = {}
    for rank in ranks:
        if int(rank) < 1:
            raise ValueError(f"ranks must be >= 1, got {rank}")
        out[int(rank)] = float(np.count_nonzero(summary.mate_rank <= int(rank))) / summary.num_mated
    return out


def tpir_from_scores(summary: OpenSetScores, fpirs: Sequence[float] = (0.01, 0.1)) -> dict[float, float]:
    fpirs = validate_rates(fpirs, "FPIR")
    if summary.num_mated == 0 or summary.num_nonmated == 0:
        raise ValueError(f"TPIR@FPIR needs mated and non-mated probes, got {summary.num_mated} mated and "
                         f"{summary.num_nonmated} non-mated")
    nonmated_desc = np.sort(summary.nonmated_best)[::-1]
    correct = summary.mate_score > summary.best_nonmate
    out = {}
    for fpir in fpirs:
        threshold = nonmated_desc[max(int(nonmated_desc.shape[0] * fpir) - 1, 0)]
        out[fpir] = float(np.count_nonzero(correct & (summary.mate_score > threshold))) / summary.num_mated
    return out


def cmc(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
        ranks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Rank-r identification rate over mated probes, for each r in ``ranks`` (module docstring)."""
    return cmc_from_scores(open_set_scores(similarity, probe_labels, gallery_labels), ranks)


def tpir_at_fpir(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray,
                 fpirs: Sequence[float] = (0.01, 0.1)) -> dict[float, float]:
    """Open-set TPIR at each target FPIR (insightface ijb_evals.py rule, module docstring)."""
    return tpir_from_scores(open_set_scores(similarity, probe_labels, gallery_labels), fpirs)
