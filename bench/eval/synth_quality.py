"""``synth-quality``: face image quality assessment on SynthFace, by error-versus-discard and against the truth.

The benchmark (:func:`bench.eval.synth_degraded.ensure_synth_quality`) is a SurvFace verification layout of
images each degraded by one nuisance at a known strength. For each quality score the protocol reports

- the error-versus-discard characteristic (EDC) of the verification comparisons and its partial area
  (:mod:`bench.eval.quality_metrics`: FNMR at a threshold fixed at FMR 1e-3, as the lowest-quality
  comparisons are discarded, a comparison's quality being the lower of its two images');
- Spearman's rho between the score and the true degradation strength, over all images and per nuisance
  (a quality score that measures degradation has rho near -1; random has 0): what SynthFace knows and no
  real dataset does.

Quality scores (higher = better):

- ``ri``: the method's own estimate (:meth:`methods.base.Method.quality`; the Recognizability Index regressor
  of method ``ri``), only for methods that estimate quality;
- ``ers``: Deng et al.'s embedding recognizability score ``1 - cos(f, u)``, ``u`` the normalised mean unit
  embedding of the benchmark's unrecognizable reference images (other identities at 4 px): computable for
  any model;
- ``norm``: the embedding's L2 norm before normalisation (MagFace's quality; any model, meaningful where the
  loss ties norm to quality);
- ``random``: uniform noise, the lower reference.

Embeddings are of one image, without the flip test, so that a quality score and the comparison scores
describe the same embedding.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, eval_input_size
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.survface import read_survface_verification
from bench.eval.lowres_real import load_resized
from bench.eval.quality_metrics import DEFAULT_MAX_DISCARD, edc, spearman
from bench.eval import synth_degraded
from bench.eval.synth_degraded import QUALITY_NUISANCES, SynthQualitySizes, ensure_synth_quality

#: The FMR at which the EDC's threshold is fixed (ISO/IEC 29794-1-style EDCs use 1e-3 or 1e-4; with 30,000
#: impostor comparisons, 1e-3 is 30 of them).
QUALITY_FMR = 1e-3
#: Seed of the ``random`` quality score.
RANDOM_QUALITY_SEED = 0


def read_degradation(path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Image names, nuisance names and strengths of ``degradation.csv`` (one-line DataError when malformed)."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        names = [row["image"] for row in rows]
        return names, np.asarray([row["nuisance"] for row in rows]), np.asarray([float(row["strength"]) for row in rows])
    except FileNotFoundError:
        raise DataError(f"{path}: degradation list not found") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: malformed degradation list ({exc})") from None


@PROTOCOLS.register("synth-quality")
class SynthQuality:
    """EDC / pAUC and the degradation oracle of every available quality score (module docstring)."""

    name: ClassVar[str] = "synth-quality"
    headline: ClassVar[str] = "pauc"
    #: The runner passes the method's quality estimator (``Method.quality``) to protocols that declare this.
    needs_quality: ClassVar[bool] = True

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None, sizes: SynthQualitySizes | None = None) -> None:
        if data.dataset != "synthface":
            raise DataError(f"synth-quality: SynthFace only (dataset '{data.dataset}'): it needs each image's "
                            f"true degradation")
        self.options = options or EvalSettings()
        sizes = sizes or synth_degraded.SYNTH_QUALITY  # read at call time: tests shrink it
        self.folder = ensure_synth_quality(data, sizes, progress)
        self.input_size = eval_input_size(data, input_size)
        verification = read_survface_verification(self.folder / "verification")
        self.images = load_resized(verification.image_paths, self.input_size)
        self.pairs, self.issame = verification.pairs, verification.issame
        names, nuisances, strengths = read_degradation(self.folder / "degradation.csv")
        order = {name: i for i, name in enumerate(names)}
        missing = [p.name for p in verification.image_paths if p.name not in order]
        if missing:
            raise DataError(f"{self.folder / 'degradation.csv'}: no degradation for image {missing[0]}")
        rows = np.asarray([order[p.name] for p in verification.image_paths])
        self.nuisances, self.strengths = nuisances[rows], strengths[rows]
        ui_paths = sorted((self.folder / "ui").glob("*.png"))
        if not ui_paths:
            raise DataError(f"{self.folder / 'ui'}: no unrecognizable reference images (*.png)")
        self.ui_images = load_resized(ui_paths, self.input_size)

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int,
                 quality: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> dict[str, Any]:
        features = extract_features(encoder, self.images, device, batch_size=batch_size, flip=False)
        ui = extract_features(encoder, self.ui_images, device, batch_size=batch_size, flip=False)
        scores = self.quality_scores(features, ui)
        if quality is not None:
            own = quality(torch.from_numpy(features).to(device))
            if own is not None:
                scores = {"ri": own.detach().float().cpu().numpy(), **scores}
        return self.score(features, scores)

    def score_features(self, features: Any, flip: bool | str = True) -> dict[str, Any]:
        raise DataError("synth-quality: scoring precomputed features is not supported (it also embeds its "
                        "unrecognizable reference images); evaluate a checkpoint instead")

    @staticmethod
    def quality_scores(features: np.ndarray, ui_features: np.ndarray) -> dict[str, np.ndarray]:
        """The method-independent quality scores of raw ``features`` ``[N, D]`` (module docstring)."""
        centre = l2_normalise(l2_normalise(ui_features).mean(axis=0, keepdims=True))[0]
        rng = np.random.default_rng(RANDOM_QUALITY_SEED)
        return {"ers": 1.0 - l2_normalise(features) @ centre, "norm": np.linalg.norm(features, axis=1),
                "random": rng.random(features.shape[0])}

    def score(self, features: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, Any]:
        """The metrics of raw ``features`` and per-image quality ``scores`` (name -> ``[N]``)."""
        unit = l2_normalise(features)
        comparison = np.einsum("pd,pd->p", unit[self.pairs[:, 0]], unit[self.pairs[:, 1]])
        genuine, impostor = self.issame, ~self.issame
        curves, pauc, rho = {}, {}, {}
        for name, q in scores.items():
            curve = edc(comparison[genuine], comparison[impostor], q[self.pairs[genuine]], q[self.pairs[impostor]],
                        fmr=QUALITY_FMR)
            curves[name], pauc[name] = curve.as_dict(), curve.pauc(DEFAULT_MAX_DISCARD)
            rho[name] = {"all": spearman(q, self.strengths),
                         **{kind: spearman(q[self.nuisances == kind], self.strengths[self.nuisances == kind])
                            for kind in QUALITY_NUISANCES if np.count_nonzero(self.nuisances == kind) > 2}}
        return {
            "fmr": QUALITY_FMR, "pauc_max_discard": DEFAULT_MAX_DISCARD, "scores": list(scores),
            "edc": curves, "pauc": pauc, "spearman": rho,
            "pauc_best": min(pauc.values()),
            "summary": {**{f"pAUC {name}": value for name, value in pauc.items()},
                        **{f"rho {name}": rho[name]["all"] for name in scores}},
            "counts": {"images": int(features.shape[0]), "genuine": int(genuine.sum()),
                       "impostor": int(impostor.sum()),
                       "per_nuisance": {k: int(np.count_nonzero(self.nuisances == k)) for k in QUALITY_NUISANCES}},
            "conventions": {
                "embedding": "f(x) of one image (no flip test), normalised for comparisons",
                "edc": "FNMR at the threshold fixed at FMR = fmr over all impostor comparisons, as the "
                       "lowest-quality genuine comparisons are discarded; comparison quality = min of its images'",
                "spearman": "rho(quality score, true degradation strength): -1 is a perfect quality measure",
                "ers": "1 - cos(f, u), u = normalised mean unit embedding of unrecognizable references (4 px)",
                "norm": "||f(x)|| before normalisation",
                "random": f"uniform(0, 1), seed {RANDOM_QUALITY_SEED}",
            },
        }

