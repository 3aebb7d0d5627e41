"""Pair verification scored as insightface scores LFW, and ``synth-lfw``, its SynthFace instance.

Scoring (insightface recognition/arcface_torch/eval/verification.py): the embedding of an image is
``normalise(f(x) + f(flip x))``; a pair's distance is the squared L2 distance of its two embeddings;
accuracy is :func:`bench.eval.metrics.kfold_accuracy` (10 contiguous folds, thresholds 0..4 step 0.01).
TAR@FAR is read off the ROC of the pairs' cosine similarities (``1 - dist / 2``).

``synth-lfw`` follows LFW's View 2 layout: 10 folds of 300 genuine then 300 impostor pairs (6,000 pairs),
every image a distinct (identity, sample) of SynthFace's held-out evaluation namespace, which shares no
identity with any training split.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings
from bench.data.datasets import EVAL_NAMESPACE, render_cached, synthface_config, synthface_world_key
from bench.data.synthface import SynthFace
from bench.eval import PROTOCOLS
from bench.eval.features import extract_features, l2_normalise
from bench.eval.metrics import kfold_accuracy, tar_at_far

#: Target FARs reported for pair verification (6,000 pairs resolve FAR down to about 1e-3).
VERIFICATION_FARS = (1e-3, 1e-2)

CONVENTIONS = {
    "embedding": "normalise(f(x) + f(flip(x)))",
    "distance": "squared L2 of unit embeddings",
    "thresholds": "0 to 3.99 step 0.01, same if dist < threshold",
    "folds": "10 contiguous (KFold shuffle=False)",
    "threshold_rule": "first best accuracy on the 9 other folds",
    "std": "population std of the 10 held-out fold accuracies",
    "tar_read_off": "ROC point with the nearest FPR, ties to the larger TPR (insightface eval_ijbc)",
    "source": "insightface recognition/arcface_torch/eval/verification.py",
}


def verification_metrics(features: np.ndarray, issame: np.ndarray,
                         fars: tuple[float, ...] = VERIFICATION_FARS) -> dict[str, Any]:
    """Accuracy and TAR@FAR of pairs ``(features[2k], features[2k+1])`` (features flip-added, unnormalised)."""
    embeddings = l2_normalise(np.asarray(features, dtype=np.float64))
    left, right = embeddings[0::2], embeddings[1::2]
    dist = np.sum((left - right) ** 2, axis=1)
    folds = kfold_accuracy(dist, issame)
    tars = tar_at_far(1.0 - dist / 2.0, issame, fars)
    return {
        "accuracy": folds.mean, "accuracy_std": folds.std,
        "fold_accuracies": folds.fold_accuracies.tolist(), "fold_thresholds": folds.fold_thresholds.tolist(),
        "tar_at_far": {f"{far:g}": tar for far, tar in tars.items()},
        "num_pairs": int(dist.shape[0]), "num_genuine": int(np.count_nonzero(issame)),
        "conventions": CONVENTIONS,
    }


def lfw_style_pairs(num_identities: int, seed: int, folds: int = 10,
                    pairs_per_kind: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Identities and sample ids of ``2P`` images forming ``P`` pairs, and ``issame`` (LFW View 2 layout).

    Fold ``f`` holds ``pairs_per_kind`` genuine pairs followed by as many impostor pairs. Sample ids are
    unique across all images, so no image appears twice.
    """
    rng = np.random.default_rng([seed, 7])
    identities, issame = [], []
    for _ in range(folds):
        same = rng.integers(0, num_identities, size=pairs_per_kind)
        identities.append(np.stack([same, same], axis=1))
        first = rng.integers(0, num_identities, size=pairs_per_kind)
        second = (first + rng.integers(1, num_identities, size=pairs_per_kind)) % num_identities
        identities.append(np.stack([first, second], axis=1))
        issame += [True] * pairs_per_kind + [False] * pairs_per_kind
    pair_identities = np.concatenate(identities).reshape(-1)
    samples = np.arange(pair_identities.shape[0])
    return pair_identities, samples, np.asarray(issame)


@PROTOCOLS.register("synth-lfw")
class SynthLFW:
    """LFW-style verification on 6,000 pairs of held-out SynthFace identities."""

    name: ClassVar[str] = "synth-lfw"
    headline: ClassVar[str] = "accuracy"
    #: Held-out identities the pairs are drawn from (LFW has 5,749 people; 1,680 with two or more images).
    num_identities: ClassVar[int] = 2000
    #: Genuine (and impostor) pairs per fold, as LFW View 2.
    pairs_per_kind: ClassVar[int] = 300

    def __init__(self, data: DataSettings, progress: bool = True) -> None:
        settings = data.synthface
        identities, samples, self.issame = lfw_style_pairs(self.num_identities, seed=settings.seed,
                                                           pairs_per_kind=self.pairs_per_kind)
        cache = (data.resolved_root() / "synthface" / synthface_world_key(settings)
                 / f"synth-lfw-{self.num_identities}-{self.pairs_per_kind}")
        self.images = render_cached(SynthFace(synthface_config(settings)), identities, samples, EVAL_NAMESPACE,
                                    cache, progress, "rendering synth-lfw pairs").images

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        features = extract_features(encoder, self.images, device, batch_size=batch_size, flip=True)
        return verification_metrics(features, self.issame)
