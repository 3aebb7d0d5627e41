"""MegaFace Challenge 1 (FaceScrub probes vs distractors): streaming scoring, the protocols, ``synth-megaface``.

The files are read by :mod:`bench.eval.formats.megaface_files` (the layout is described there).

Identification (the devkit's rule, as FaceX-Zoo's megaface_evaluator.py reimplements it): features are
L2-normalised and scored by cosine (the devkit's Euclidean distance ranks unit vectors identically). For
every identity and every ordered pair ``(i, j)``, ``i != j``, of its probe images, image ``i`` is the
gallery, hidden among the distractors, and ``j`` the probe: found at rank ``N`` when
``s(j, i) >= the N-th largest s(j, d)`` over distractors ``d`` (FaceX-Zoo's ``>=``; the closed-source
devkit binary's tie rule is unknown). Rank-N accuracy = found / sum_c |P_c| (|P_c| - 1). Only each
probe's top-N distractor scores matter, so distractors stream through in chunks (:class:`DistractorScorer`):
memory is probes x chunk, never probes x 1M.

Verification: genuine pairs are the probes' same-identity pairs, impostor pairs every probe x distractor
pair of the largest distractor set; TAR at FAR 1e-6 uses the threshold above which at most
``floor(FAR * impostors)`` impostor scores lie ("at most" read-off; users of the devkit's ROC disagree
between interpolating and taking the first point above the target). Only the top impostor scores are kept.

Raw and refined: ``refined`` applies insightface's noise lists as its remove_noises.py does under L2: a
noisy FaceScrub image gets the feature ``normalise(sum of its identity's clean features + U(-0.001,
0.001))``; a noisy distractor can never rank (insightface appends a 513th dimension of 100), which under
cosine means it is removed from the distractor set. Every result is labelled raw or refined.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, eval_input_size, locate_benchmark
from bench.eval.features import extract_features
from bench.eval.formats.images import read_array, resize_images, stack_arrays
from bench.eval.formats.megaface_files import FACESCRUB_NOISES, MEGAFACE_NOISES, read_feature_file, read_megaface

MEGAFACE_RANKS = (1, 5, 10)
MEGAFACE_FARS = (1e-6,)
#: Distractors scored per chunk: memory ~ probes x chunk float32 (3,530 x 8,192 = 115 MB).
DISTRACTOR_CHUNK = 8192
#: Seed of the uniform noise insightface's remove_noises.py adds to a noisy FaceScrub image's centre.
NOISE_SEED = 0
NOISE_AMPLITUDE = 0.001
#: Distractor images kept in memory between encoders when they fit (bytes); larger sets stream per encoder.
IMAGE_CACHE_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------------
# Streaming identification and verification
# ----------------------------------------------------------------------------------------------------


def _normalise_rows(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


class DistractorScorer:
    """Per-probe top-``max_rank`` distractor scores for several distractor sets in one pass, and the top
    impostor scores of one set for verification.

    Feed chunks with :meth:`update(features, membership)`: ``features`` ``[C, D]`` (normalised here) and
    ``membership`` a bool ``[num_sets, C]`` saying which sets each distractor belongs to. Memory is
    ``probes x C`` plus the kept top scores.
    """

    def __init__(self, probes: np.ndarray | torch.Tensor, num_sets: int, max_rank: int,
                 verification_set: int | None = None, verification_keep: int = 0) -> None:
        self.probes = _normalise_rows(torch.as_tensor(np.asarray(probes), dtype=torch.float32))
        self.max_rank = int(max_rank)
        self.top = [self.probes.new_empty((self.probes.shape[0], 0)) for _ in range(num_sets)]
        self.counts = np.zeros(num_sets, dtype=np.int64)
        self.verification_set, self.keep = verification_set, int(verification_keep)
        self.impostors = self.probes.new_empty(0)

    def update(self, features: np.ndarray | torch.Tensor, membership: np.ndarray) -> None:
        chunk = _normalise_rows(torch.as_tensor(np.asarray(features), dtype=torch.float32))
        scores = self.probes @ chunk.T
        self.update_scores(scores, membership)

    def update_scores(self, scores: torch.Tensor, membership: np.ndarray) -> None:
        membership = np.asarray(membership, dtype=bool).reshape(len(self.top), scores.shape[1])
        for index, member in enumerate(membership):
            if not member.any():
                continue
            part = scores if member.all() else scores[:, torch.from_numpy(member)]
            self.counts[index] += part.shape[1]
            # the chunk's own top-k first, so the merge copies probes x 2k, not probes x chunk
            part_top = torch.topk(part, min(self.max_rank, part.shape[1]), dim=1).values
            merged = torch.cat([self.top[index], part_top], dim=1)
            self.top[index] = torch.topk(merged, min(self.max_rank, merged.shape[1]), dim=1).values
            if index == self.verification_set and self.keep > 0:
                floor = self.impostors.min() if self.impostors.shape[0] >= self.keep else None
                candidates = part.reshape(-1) if floor is None else part[part > floor]
                merged = torch.cat([self.impostors, candidates])
                self.impostors = torch.topk(merged, min(self.keep, merged.shape[0])).values

    def thresholds(self, set_index: int, rank: int) -> np.ndarray:
        """The ``rank``-th largest distractor score of each probe (-inf when the set has fewer)."""
        top = self.top[set_index]
        if top.shape[1] < rank:
            return np.full(top.shape[0], -np.inf, dtype=np.float32)
        return top[:, rank - 1].numpy()


def identity_groups(labels: Sequence[Any]) -> np.ndarray:
    """Integer identity index of each probe (0..C-1)."""
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.asarray(labels), return_inverse=True)[1].ravel()


def _probe_similarity(probes: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarity of every probe pair (P x P; 3,530 probes: 50 MB)."""
    unit = np.asarray(probes, dtype=np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def hit_rates(probes: torch.Tensor | np.ndarray, groups: np.ndarray,
              thresholds: dict[int, np.ndarray]) -> dict[int, float]:
    """MegaFace hit rule over every ordered same-identity pair (gallery i, probe j), i != j:
    found at rank N when ``s(j, i) >= thresholds[N][j]`` (the N-th largest distractor score of probe j)."""
    similarity = _probe_similarity(probes)  # row j = probe, column i = gallery image
    pairs = (groups[:, None] == groups[None, :]) & ~np.eye(groups.shape[0], dtype=bool)
    total = int(pairs.sum())
    if total == 0:
        raise ValueError("no identity has two probe images: the MegaFace rule needs same-identity pairs")
    return {rank: int(np.count_nonzero(pairs & (similarity >= threshold[:, None]))) / total
            for rank, threshold in thresholds.items()}


def genuine_scores(probes: np.ndarray | torch.Tensor, labels: Sequence[Any]) -> np.ndarray:
    """Cosine scores of the unordered same-identity probe pairs."""
    groups = identity_groups(labels)
    similarity = _probe_similarity(probes)
    upper = np.triu(groups[:, None] == groups[None, :], k=1)
    return similarity[upper]


def tar_at_far_top_impostors(genuine: np.ndarray, top_impostors: np.ndarray, num_impostors: int,
                             fars: Sequence[float] = MEGAFACE_FARS) -> dict[float, float]:
    """TAR at each FAR with the "at most" rule from the largest impostor scores only.

    Threshold = the ``floor(far * num_impostors)``-th (0-based) largest impostor score; TAR = share of
    genuine scores above it, so at most ``floor(far * num_impostors)`` impostors are accepted.
    """
    top = np.sort(np.asarray(top_impostors, dtype=np.float64))[::-1]
    out = {}
    for far in fars:
        k = int(np.floor(far * num_impostors))
        if k >= top.shape[0] and top.shape[0] < num_impostors:
            raise ValueError(f"kept {top.shape[0]} impostor scores, FAR {far} needs {k + 1}")
        threshold = top[k] if k < top.shape[0] else -np.inf
        out[far] = float(np.count_nonzero(genuine > threshold)) / max(genuine.shape[0], 1)
    return out


def rank_accuracy(probe_features: np.ndarray, probe_labels: Sequence[Any], distractor_features: np.ndarray,
                  ranks: Sequence[int] = (1,), chunk: int = DISTRACTOR_CHUNK) -> dict[int, float]:
    """``{rank: accuracy}`` under the MegaFace hit rule (module docstring), distractors streamed in chunks.

    Features are L2-normalised here; scores are cosines. ``distractor_features`` may be a memmap.
    """
    probe_features = np.asarray(probe_features)
    ranks = [int(r) for r in ranks]
    if probe_features.ndim != 2 or len(probe_labels) != probe_features.shape[0]:
        raise ValueError(f"expected probe features [P, D] with P labels, got {probe_features.shape} and "
                         f"{len(probe_labels)} labels")
    if distractor_features.ndim != 2 or distractor_features.shape[1] != probe_features.shape[1]:
        raise ValueError(f"distractor features must be [N, {probe_features.shape[1]}], got {distractor_features.shape}")
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if not np.all(np.isfinite(probe_features)):
        raise ValueError("probe features contain NaN or infinite values")
    scorer = DistractorScorer(probe_features, num_sets=1, max_rank=max(ranks))
    for start in range(0, distractor_features.shape[0], chunk):
        part = np.asarray(distractor_features[start:start + chunk])
        if not np.all(np.isfinite(part)):
            raise ValueError("distractor features contain NaN or infinite values")
        scorer.update(part, np.ones((1, part.shape[0]), dtype=bool))
    return hit_rates(scorer.probes, identity_groups(probe_labels),
                      {rank: scorer.thresholds(0, rank) for rank in ranks})


# ----------------------------------------------------------------------------------------------------
# The benchmark folder and the protocols
# ----------------------------------------------------------------------------------------------------


def refined_probes(probes: np.ndarray, labels: Sequence[str], noisy: np.ndarray, seed: int = NOISE_SEED) -> np.ndarray:
    """insightface remove_noises.py for FaceScrub: a noisy image's feature becomes its identity's centre
    (the sum of the identity's clean unit features) plus U(-0.001, 0.001) noise, normalised."""
    unit = probes / np.maximum(np.linalg.norm(probes, axis=1, keepdims=True), 1e-12)
    out = unit.copy()
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    for index in np.flatnonzero(noisy):
        clean = (labels == labels[index]) & ~noisy
        centre = unit[clean].sum(axis=0)
        vector = centre + rng.uniform(-NOISE_AMPLITUDE, NOISE_AMPLITUDE, size=centre.shape[0])
        out[index] = vector / max(np.linalg.norm(vector), 1e-12)
    return out


class MegaFaceProtocol:
    """MegaFace Challenge 1: identification rank-N at every distractor size, verification TAR@FAR=1e-6."""

    name: ClassVar[str] = "megaface"
    headline: ClassVar[str] = "rank"

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None) -> None:
        self.options = options or EvalSettings()
        self.input_size = eval_input_size(data, input_size)
        self.stored_sizes: set[str] = set()
        self.set = read_megaface(self.locate(data, progress))
        self.variants = list(self.options.megaface_variants)
        if "refined" in self.variants and self.set.probe_noise is None:
            raise DataError(f"{self.set.root}: the refined variant needs {FACESCRUB_NOISES} and {MEGAFACE_NOISES} "
                            f"there; add them or set eval.megaface_variants=raw")
        self.probe_images = self._load(self.set.root / "facescrub_images", self.set.probe_paths)
        distractor_bytes = len(self.set.distractor_paths) * 3 * self.input_size ** 2
        self.distractor_images = (self._load(self.set.root / "megaface_images", self.set.distractor_paths)
                                  if distractor_bytes <= IMAGE_CACHE_BYTES else None)

    def locate(self, data: DataSettings, progress: bool) -> Path:
        return locate_benchmark(self.name, data, "megaface", kind="dir")

    def _load(self, folder: Path, paths: Sequence[str]) -> torch.Tensor:
        images = [read_array(folder / p) for p in paths]
        self.stored_sizes.update(f"{im.shape[0]}x{im.shape[1]}" for im in images)  # for the conventions
        if len({im.shape for im in images}) > 1:  # mixed sizes: bring each to the input size first
            return torch.cat([resize_images(stack_arrays([im]), self.input_size) for im in images])
        return resize_images(stack_arrays(images), self.input_size)

    def _distractor_chunks(self, encoder: nn.Module, device: torch.device,
                           batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        total = len(self.set.distractor_paths)
        for start in range(0, total, DISTRACTOR_CHUNK):
            stop = min(start + DISTRACTOR_CHUNK, total)
            images = (self.distractor_images[start:stop] if self.distractor_images is not None else
                      self._load(self.set.root / "megaface_images", self.set.distractor_paths[start:stop]))
            yield start, extract_features(encoder, images, device, batch_size=batch_size, flip=self.options.flip)

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        probes = extract_features(encoder, self.probe_images, device, batch_size=batch_size, flip=self.options.flip)
        return self._score(probes, self._distractor_chunks(encoder, device, batch_size), flip=self.options.flip)

    def score_features(self, features: Path | str, flip: bool | str = True) -> dict[str, Any]:
        """Metrics from devkit feature files under ``features/facescrub`` and ``features/megaface``."""
        root = Path(features)
        ending = self._file_ending(root)
        probes = np.stack([read_feature_file(root / "facescrub" / (p + ending)) for p in self.set.probe_paths])

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            paths = self.set.distractor_paths
            for start in range(0, len(paths), DISTRACTOR_CHUNK):
                yield start, np.stack([read_feature_file(root / "megaface" / (p + ending))
                                       for p in paths[start:start + DISTRACTOR_CHUNK]])

        return self._score(probes, chunks(), flip=flip if not isinstance(flip, bool) else f"devkit files {root}")

    def _file_ending(self, root: Path) -> str:
        first = root / "facescrub" / self.set.probe_paths[0]
        matches = sorted(first.parent.glob(glob_escape(first.name) + "*"), key=lambda p: len(p.name))
        if not matches:
            raise DataError(f"{root}: no feature file for the first probe ({first}<ending>); "
                            f"expected facescrub/<path><file_ending> and megaface/<path><file_ending>")
        return matches[0].name[len(first.name):]

    def _score(self, probes: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], flip: bool | str) -> dict[str, Any]:
        s = self.set
        variant_probes = {"raw": probes}
        if "refined" in self.variants:
            variant_probes["refined"] = refined_probes(probes, s.probe_ids, s.probe_noise)
        largest = len(s.sizes) - 1
        num_probes = len(s.probe_paths)
        keep = int(np.floor(max(MEGAFACE_FARS) * num_probes * s.sizes[-1])) + 1
        scorers = {v: DistractorScorer(p, len(s.sizes), max(MEGAFACE_RANKS), largest, keep)
                   for v, p in variant_probes.items() if v in self.variants}
        refined_rows = (torch.from_numpy(np.flatnonzero(s.probe_noise)) if "refined" in scorers else None)
        for start, features in chunks:
            membership = s.membership[:, start:start + features.shape[0]]
            chunk = _normalise_rows(torch.as_tensor(features, dtype=torch.float32))
            raw_scores = None
            for variant, scorer in scorers.items():
                if variant == "raw" or raw_scores is None:
                    scores = scorer.probes @ chunk.T
                    raw_scores = scores if variant == "raw" else raw_scores
                else:  # refined: the raw scores with the noisy probes' rows replaced, noisy distractors dropped
                    scores = raw_scores.clone()
                    scores[refined_rows] = scorer.probes[refined_rows] @ chunk.T
                member = membership
                if variant == "refined":
                    member = membership & ~s.distractor_noise[start:start + features.shape[0]][None]
                scorer.update_scores(scores, member)
        groups = identity_groups(s.probe_ids)
        result: dict[str, Any] = {}
        for variant, scorer in scorers.items():
            per_size = {}
            for index, size in enumerate(s.sizes):
                rates = hit_rates(scorer.probes, groups, {r: scorer.thresholds(index, r) for r in MEGAFACE_RANKS})
                per_size[str(size)] = {"rank": {str(r): v for r, v in rates.items()},
                                       "num_distractors": int(scorer.counts[index])}
            genuine = genuine_scores(scorer.probes.numpy(), s.probe_ids)
            impostors = num_probes * int(scorer.counts[largest])
            tars = tar_at_far_top_impostors(genuine, scorer.impostors.numpy(), impostors)
            result[variant] = {
                "identification": per_size,
                "verification": {"tar_at_far": {f"{far:g}": v for far, v in tars.items()},
                                 "distractors": int(scorer.counts[largest]), "num_genuine": int(genuine.shape[0]),
                                 "num_impostor": impostors},
            }
            if variant == "refined":
                result[variant]["removed"] = {"probe_noise": int(s.probe_noise.sum()),
                                              "distractor_noise": int(s.distractor_noise.sum())}
        shown = "refined" if "refined" in result else "raw"
        top = str(s.sizes[-1])
        result["summary"] = {f"rank-1 {shown}": result[shown]["identification"][top]["rank"]["1"]}
        result["num_probes"], result["sizes"], result["folder"] = num_probes, s.sizes, str(s.root)
        generated = _generation_info(s.root)
        if generated is not None:
            result["generated"] = generated
        result["conventions"] = self.conventions(flip)
        return result

    def conventions(self, flip: bool | str) -> dict[str, str]:
        feature = ("normalise(f(x) + f(flip(x)))" if flip is True else "normalise(f(x)) (no flip test)"
                   if flip is False else f"normalise(features supplied by the user: {flip})")
        return {
            "feature": feature + (self._resize_text() if isinstance(flip, bool) else ""),  # images embedded here
            "score": "cosine (ranks as the devkit's Euclidean distance of unit vectors)",
            "identification": "each probe image in turn is the gallery among the distractors for every other image "
                              "of its identity; found at rank N if s(probe, gallery) >= the N-th largest "
                              "s(probe, distractor) (FaceX-Zoo megaface_evaluator.py); accuracy over ordered pairs",
            "verification": "genuine = same-identity probe pairs, impostor = probe x distractor at the largest "
                            "size; TAR at FAR 1e-6 with the at-most read-off (at most floor(FAR x impostors) "
                            "impostors above the threshold)",
            "variants": "raw: every file; refined: insightface noise lists (FaceScrub noise -> identity centre + "
                        "U(+-0.001), distractor noise removed, i.e. remove_noises.py under L2)",
            "source": "MegaFace devkit run_experiment.py, insightface recognition/_evaluation_/megaface",
        }


    def _resize_text(self) -> str:
        """What the conventions say about image sizes: the images stored at another size than the model's
        input were resized (each size found is listed)."""
        target = f"{self.input_size}x{self.input_size}"
        other = sorted(self.stored_sizes - {target})
        if not other:
            return ""
        return f"; images stored at {', '.join(other)} resized to {target} with antialiasing"


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


PROTOCOLS.register("megaface", MegaFaceProtocol)


@PROTOCOLS.register("synth-megaface")
class SynthMegaFace(MegaFaceProtocol):
    """MegaFace-style identification among held-out SynthFace distractors, written as a devkit folder (see
    :mod:`bench.eval.synth_benchmarks` for its sizes)."""

    name: ClassVar[str] = "synth-megaface"

    def locate(self, data: DataSettings, progress: bool) -> Path:
        from bench.eval.synth_benchmarks import SYNTH_MEGAFACE, ensure_synth_megaface

        return ensure_synth_megaface(data, SYNTH_MEGAFACE, progress)


def _generation_info(folder: Path) -> dict | None:
    from bench.eval.synth_benchmarks import generation_info

    return generation_info(folder)
