"""``synth-lowres``: very-low-resolution recognition on SynthFace, per probe resolution.

The benchmark (:func:`bench.eval.synth_degraded.ensure_synth_lowres`) holds, per probe resolution ``r``, a
TinyFace layout (LR probes against an HR gallery with distractors) and two SurvFace verification layouts
(HR-vs-LR and LR-vs-LR pairs), read here by the real readers. Reported per resolution, as the
low-resolution literature does (TinyFace's rank-k; SurvFace's TAR@FAR; Chai et al. 2023, Sec. 4, evaluate
both settings): 1:N rank-1 and rank-5 of the LR probes against the HR gallery (distractors included), 1:1
TAR@FAR of HR-vs-LR pairs, and TAR@FAR of LR-vs-LR pairs; plus rank-1 / rank-5 of the same probes at full
resolution as the reference. LR probes are stored at their native size and brought to the model's input
size with bilinear interpolation (the upsampling a deployed model applies to a tiny detection).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, eval_input_size
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.survface import read_survface_verification
from bench.eval.formats.tinyface import read_tinyface
from bench.eval.lowres_real import load_resized
from bench.eval.metrics import cmc, tar_at_far
from bench.eval.synth_benchmarks import generation_info
from bench.eval import synth_degraded
from bench.eval.synth_degraded import SynthLowResSizes, ensure_synth_lowres
from bench.eval.verification import embedding_text

#: FARs of the 1:1 tables (the pair lists hold 10 impostors per genuine pair: FAR 1e-3 is about 6 impostors).
LOWRES_FARS = (1e-3, 1e-2)
LOWRES_RANKS = (1, 5)


def far_key(far: float) -> str:
    return f"{far:g}"


def identification(probes: np.ndarray, probe_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray,
                   distractors: np.ndarray) -> dict[str, float]:
    """Rank-1 / rank-5 of unit ``probes`` against unit ``gallery`` plus ``distractors`` (unique negative labels)."""
    labels = np.concatenate([gallery_ids, -1 - np.arange(distractors.shape[0])])
    similarity = probes @ np.concatenate([gallery, distractors]).T
    rates = cmc(similarity, probe_ids, labels, LOWRES_RANKS)
    return {f"rank{r}": rates[r] for r in LOWRES_RANKS}


def pair_tar(features: np.ndarray, pairs: np.ndarray, issame: np.ndarray) -> dict[str, float]:
    """TAR at :data:`LOWRES_FARS` of cosine scores of unit ``features`` over ``pairs``."""
    scores = np.einsum("pd,pd->p", features[pairs[:, 0]], features[pairs[:, 1]])
    return {far_key(far): tar for far, tar in tar_at_far(scores, issame, LOWRES_FARS).items()}


@PROTOCOLS.register("synth-lowres")
class SynthLowRes:
    """Per-resolution HR-vs-LR identification and verification, and LR-vs-LR verification (module docstring)."""

    name: ClassVar[str] = "synth-lowres"
    headline: ClassVar[str] = "rank1"

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None, sizes: SynthLowResSizes | None = None) -> None:
        if data.dataset != "synthface":
            raise DataError(f"synth-lowres: SynthFace only (dataset '{data.dataset}'); real low-resolution "
                            f"benchmarks are the tinyface and survface protocols")
        self.options = options or EvalSettings()
        sizes = sizes or synth_degraded.SYNTH_LOWRES  # read at call time: tests shrink it
        self.folder = ensure_synth_lowres(data, sizes, progress)
        self.resolutions = tuple(sizes.resolutions)
        self.input_size = eval_input_size(data, input_size)
        hr = read_tinyface(self.folder / "hr" / "tinyface")
        self.gallery_ids, self.probe_ids = hr.gallery_ids, hr.probe_ids
        self.gallery = load_resized(hr.gallery_paths, self.input_size)
        self.distractors = load_resized(hr.distractor_paths, self.input_size)
        self.probes = {"hr": load_resized(hr.probe_paths, self.input_size)}
        self.pairs: dict[str, dict[str, Any]] = {}
        for r in self.resolutions:
            label = f"px{r:02d}"
            tiny = read_tinyface(self.folder / label / "tinyface")
            if not np.array_equal(tiny.probe_ids, self.probe_ids):
                raise DataError(f"{self.folder / label}: its probes are not those of the full-resolution set")
            self.probes[label] = load_resized(tiny.probe_paths, self.input_size)
            for setting in ("hr-lr", "lr-lr"):
                verification = read_survface_verification(self.folder / label / setting)
                self.pairs[f"{label}/{setting}"] = {"images": load_resized(verification.image_paths, self.input_size),
                                                    "pairs": verification.pairs, "issame": verification.issame}

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        flip = self.options.flip

        def embed(images: torch.Tensor) -> np.ndarray:
            return l2_normalise(extract_features(encoder, images, device, batch_size=batch_size, flip=flip))

        gallery, distractors = embed(self.gallery), embed(self.distractors)
        hr = identification(embed(self.probes["hr"]), self.probe_ids, gallery, self.gallery_ids, distractors)
        per_resolution = {}
        for r in self.resolutions:
            label = f"px{r:02d}"
            row: dict[str, Any] = identification(embed(self.probes[label]), self.probe_ids, gallery,
                                                 self.gallery_ids, distractors)
            for setting, key in (("hr-lr", "tar_at_far"), ("lr-lr", "lr_tar_at_far")):
                entry = self.pairs[f"{label}/{setting}"]
                row[key] = pair_tar(embed(entry["images"]), entry["pairs"], entry["issame"])
            per_resolution[str(r)] = row
        return self._metrics(hr, per_resolution, flip)

    def score_features(self, features: Any, flip: bool | str = True) -> dict[str, Any]:
        raise DataError("synth-lowres: scoring precomputed features is not supported (its images differ per "
                        "resolution); evaluate a checkpoint instead")

    def _pair_counts(self) -> dict[str, dict[str, int]]:
        """Genuine and impostor pairs of each verification setting (the same at every resolution)."""
        first = f"px{self.resolutions[0]:02d}"
        return {setting: {"genuine": int(self.pairs[f"{first}/{setting}"]["issame"].sum()),
                          "impostor": int((~self.pairs[f"{first}/{setting}"]["issame"]).sum())}
                for setting in ("hr-lr", "lr-lr")}

    def _metrics(self, hr: dict[str, float], per_resolution: dict[str, Any], flip: bool | str) -> dict[str, Any]:
        rank1 = [per_resolution[str(r)]["rank1"] for r in self.resolutions]
        summary = {f"rank-1 {r}px": per_resolution[str(r)]["rank1"] for r in self.resolutions}
        summary["rank-1 mean"] = float(np.mean(rank1))
        summary["rank-1 HR"] = hr["rank1"]
        info = generation_info(self.folder) or {}
        return {
            "resolutions": list(self.resolutions), "per_resolution": per_resolution, "hr": hr,
            "rank1": summary["rank-1 mean"], "summary": summary,
            "counts": {"probes": int(self.probe_ids.shape[0]), "gallery": int(self.gallery_ids.shape[0]),
                       "distractors": int(self.distractors.shape[0]), "pairs": self._pair_counts()},
            "conventions": {
                "embedding": embedding_text(flip),
                "probes": "rendered at the training size, brought down to r x r px (antialiased bilinear), stored "
                          "at that size; every image is resized to the model input (bilinear) before embedding",
                "identification": "rank-k of each LR probe against the HR gallery (one image per subject) plus "
                                  "HR distractors of other identities; ties count against",
                "hr-lr": "1:1 pairs: an HR gallery image against an LR probe; lr-lr: two LR probes",
                "rank1": "the headline: mean rank-1 over the probe resolutions",
                "generated": {k: info.get(k) for k in ("sizes", "offsets")},
            },
        }
