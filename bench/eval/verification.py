"""Pair verification on insightface's ``.bin`` packs (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) and ``synth-lfw``.

The files are read by :mod:`bench.eval.formats.bin` (the layout is described there).

Scoring (insightface verification.py): the embedding of an image is ``normalise(f(x) + f(flip x))``; a
pair's distance is the squared L2 distance of its two embeddings; accuracy is
:func:`bench.eval.metrics.kfold_accuracy` (10 contiguous folds, thresholds 0..4 step 0.01). TAR@FAR is
read off the ROC of the pairs' cosine similarities (``1 - dist / 2``).

Images are 112 x 112 in the real packs; when the model's input size differs (SynthFace's 32 x 32) they
are resized with antialiasing, and the conventions say so.

``synth-lfw`` follows LFW's View 2 layout: 10 folds of 300 genuine then 300 impostor pairs (6,000 pairs),
every image a distinct (identity, sample) of SynthFace's held-out evaluation namespace, which shares no
identity with any training split. :mod:`bench.eval.synth_benchmarks` writes it as a real ``.bin`` (PNG
entries, lossless, so the pixels are exactly the rendered ones), read back by :func:`load_bin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.eval import PROTOCOLS, eval_input_size, features_file, locate_benchmark
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.bin import load_bin
from bench.eval.formats.images import resize_images
from bench.eval.metrics import compact_roc, kfold_accuracy, roc, tar_at_far

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
READ_OFF_TEXT = {
    "nearest": CONVENTIONS["tar_read_off"],
    "at_most": "largest TPR with FPR <= target (strict read-off)",
}


def embedding_text(flip: bool) -> str:
    return "normalise(f(x) + f(flip(x)))" if flip else "normalise(f(x)) (no flip test)"


def verification_metrics(features: np.ndarray, issame: np.ndarray, fars: tuple[float, ...] = VERIFICATION_FARS,
                         read_off: str = "nearest", flip: bool = True) -> dict[str, Any]:
    """Accuracy and TAR@FAR of pairs ``(features[2k], features[2k+1])`` (features flip-added, unnormalised)."""
    features = np.asarray(features, dtype=np.float64)
    issame = np.asarray(issame)
    if features.ndim != 2 or features.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"expected features [2P, D] for P = {issame.shape[0]} pairs, got {features.shape}")
    embeddings = l2_normalise(features)
    left, right = embeddings[0::2], embeddings[1::2]
    dist = np.sum((left - right) ** 2, axis=1)
    folds = kfold_accuracy(dist, issame)
    similarity = 1.0 - dist / 2.0
    tars = tar_at_far(similarity, issame, fars, mode=read_off)
    fpr, tpr, _ = roc(similarity, issame)
    return {
        "accuracy": folds.mean, "accuracy_std": folds.std,
        "fold_accuracies": folds.fold_accuracies.tolist(), "fold_thresholds": folds.fold_thresholds.tolist(),
        "tar_at_far": {f"{far:g}": tar for far, tar in tars.items()},
        "num_pairs": int(dist.shape[0]), "num_genuine": int(np.count_nonzero(issame)),
        "roc": compact_roc(fpr, tpr, int(np.count_nonzero(~issame.astype(bool)))),
        "conventions": {**CONVENTIONS, "embedding": embedding_text(flip), "tar_read_off": READ_OFF_TEXT[read_off]},
    }


# ----------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------


class BinVerification:
    """Verification on one ``.bin`` pack: images loaded and resized once, scored per encoder."""

    name: ClassVar[str]
    headline: ClassVar[str] = "accuracy"
    #: File name of the pack in insightface's training-set zips (``faces_emore/lfw.bin``).
    filename: ClassVar[str] = ""

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None) -> None:
        self.options = options or EvalSettings()
        self.input_size = eval_input_size(data, input_size)
        self.path = self.locate(data, progress)
        images, self.issame = load_bin(self.path)
        self.source_size = int(images.shape[1])
        self.images = resize_images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), self.input_size)

    def locate(self, data: DataSettings, progress: bool) -> Path:
        return locate_benchmark(self.name, data, self.filename, kind="file")

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        features = extract_features(encoder, self.images, device, batch_size=batch_size, flip=self.options.flip)
        return self.score_features(features, flip=self.options.flip)

    def score_features(self, features: np.ndarray | Path, flip: bool | str = True) -> dict[str, Any]:
        """Metrics of image features in the pack's order (``[2P, D]``, or a ``.npy`` holding them)."""
        if isinstance(features, (str, Path)):
            features = features_file(Path(features), 2 * self.issame.shape[0], f"one row per image of {self.path.name}")
        out = verification_metrics(features, self.issame, read_off=self.options.tar_read_off, flip=flip is True)
        if not isinstance(flip, bool):
            out["conventions"]["embedding"] = f"normalise(features supplied by the user: {flip})"
        out["conventions"]["images"] = (f"{self.source_size}x{self.source_size} from {self.path.name}"
                                        + (f", resized to {self.input_size}x{self.input_size} with antialiasing"
                                           if self.source_size != self.input_size else ""))
        out["file"] = str(self.path)
        generated = _generation_info(self.path.parent)
        if generated is not None:
            out["generated"] = generated
        return out


#: The LFW family, as packed by insightface (pairs: LFW 6,000; CFP-FP 7,000; AgeDB-30, CALFW, CPLFW 6,000).
BIN_PACKS = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")

for _pack in BIN_PACKS:
    PROTOCOLS.register(_pack, type(f"Bin_{_pack}", (BinVerification,), {
        "name": _pack, "filename": f"{_pack}.bin",
        "__doc__": f"Verification on insightface's {_pack}.bin (10-fold accuracy, TAR@FAR).",
    }))


@PROTOCOLS.register("synth-lfw")
class SynthLFW(BinVerification):
    """LFW-style verification on 6,000 pairs of held-out SynthFace identities, through a generated ``.bin``."""

    name: ClassVar[str] = "synth-lfw"
    #: Held-out identities the pairs are drawn from (LFW has 5,749 people; 1,680 with two or more images).
    num_identities: ClassVar[int] = 2000
    #: Genuine (and impostor) pairs per fold, as LFW View 2.
    pairs_per_kind: ClassVar[int] = 300

    def locate(self, data: DataSettings, progress: bool) -> Path:
        from bench.eval.synth_benchmarks import ensure_synth_lfw

        return ensure_synth_lfw(data, self.num_identities, self.pairs_per_kind, progress)


def _generation_info(folder: Path) -> dict | None:
    from bench.eval.synth_benchmarks import generation_info

    return generation_info(folder)
