"""Real very-low-resolution benchmarks: TinyFace identification and QMUL-SurvFace verification and open-set
identification (``tinyface``, ``survface``), and :func:`load_resized`, which brings their images to the
model's input size.

The files are read by :mod:`bench.eval.formats.tinyface` and :mod:`bench.eval.formats.survface` (the layouts
and their sources are described there). What the user must obtain (FaceBench cannot download either set):

- TinyFace (Cheng, Zhu, Gong, ACCV 2018), qmul-tinyface.github.io: the ``tinyface/`` folder holding
  ``Testing_Set/``; found at ``$FACEBENCH_TINYFACE``, else ``<data root>/eval/tinyface``;
- QMUL-SurvFace (Cheng, Zhu, Gong, arXiv 1804.09691), qmul-survface.github.io: the ``QMUL-SurvFace/`` folder
  holding ``Face_Verification_Test_Set/`` and ``Face_Identification_Test_Set/``; found at
  ``$FACEBENCH_SURVFACE``, else ``<data root>/eval/QMUL-SurvFace``.

Images. Both sets hold native low-resolution crops of varying sizes (on average about 20 x 16 px in the
TinyFace paper, 24 x 20 px in the SurvFace paper). Each image is resized straight to the model's input ``S x S`` (aspect ratio not
kept, as the public evaluations' ``cv2.resize(img, (112, 112))``) with antialiased bilinear interpolation
(:func:`bench.eval.formats.images.resize_images`), which for these sets is an upsampling. Features: ``f(x) +
f(flip x)`` with the flip test (``eval.flip``), L2-normalised; scores are cosines.

TinyFace (the README's "Evaluation Instruction" and ``test_face_identification.m``, as ported to Python): the
gallery is every Gallery_Match image plus every Gallery_Distractor image (labelled ``-100``, so never a mate).
A probe's rank is the position of its first mate image in the gallery sorted by score: ``1 + #{non-mate
gallery images scoring >= its best mate image}`` (ties count against the probe; the script's ``argsort``
breaks them arbitrarily). Rank-1/5/20 (the ranks AdaFace reports; the script also prints 10 and 50) are the
shares of probes within each rank (CMC). The script ranks by Euclidean distance of the supplied features;
for unit features that is the cosine order.

QMUL-SurvFace (paper sections 4-5, protocols page):

- verification: cosine of each of the 5,320 positive and 5,320 negative pairs; TAR at FAR 0.001, 0.01, 0.1,
  0.3 (the paper's verification table) read off the ROC (``eval.tar_read_off``; the default ``nearest`` is the
  nearest-FPR read-off the public Python ports use);
- open-set identification: one template per gallery identity, the L2-normalised mean of its images' unit
  features (the public Python ports' pooling; the MATLAB code's is *unconfirmed*); probes = mated and unmated.
  ``tpir20_at_fpir`` is the paper's TPIR20@FPIR (mate within the top 20 templates and scoring above the
  threshold), ``tpir_at_fpir`` the rank-1 TPIR of :func:`bench.eval.metrics.tpir_at_fpir`; both at FPIR 0.3,
  0.2, 0.1 (the paper's) and 0.01, with the threshold rule of :mod:`bench.eval.metrics` (the
  ``max(floor(N_nm x FPIR) - 1, 0)``-th largest unmated best score; the ports' 1000-step threshold grid
  read-off differs slightly). ``rank1`` is the share of mated probes whose mate template ranks first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.eval import PROTOCOLS, eval_input_size, features_file, locate_benchmark
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.images import read_image, resize_images
from bench.eval.formats.survface import read_survface_identification, read_survface_verification
from bench.eval.formats.tinyface import DISTRACTOR_LABEL, read_tinyface
from bench.eval.metrics import (
    OpenSetScores,
    cmc_from_scores,
    concat_open_set,
    open_set_scores,
    tar_at_far,
    tpir_from_scores,
)

TINYFACE_RANKS = (1, 5, 20)
#: The SurvFace paper's verification FARs and identification FPIRs (0.01 added: reported by later work).
SURVFACE_FARS = (1e-3, 1e-2, 1e-1, 0.3)
SURVFACE_FPIRS = (0.01, 0.1, 0.2, 0.3)
SURVFACE_RANKS = (1, 5, 10, 20)
#: The rank of the paper's TPIR ("TPIR20@FPIR").
SURVFACE_TPIR_RANK = 20
#: Resized images kept in memory between encoders when they fit (bytes); larger sets are re-read per encoder.
IMAGE_CACHE_BYTES = 1 << 30
#: Images decoded, resized and embedded per chunk when streaming.
STREAM_CHUNK = 4096
#: TinyFace probes scored per block (a block is probes x (1 + gallery) float32: 128 x 158k = 80 MB).
TINYFACE_PROBE_BLOCK = 128
#: SurvFace probes scored per block against the gallery templates.
SURVFACE_PROBE_BLOCK = 4096
#: A score below any cosine: where a probe's own mate images stand among its non-mates (see :func:`mate_first`).
MATE_FLOOR = -2.0


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def _load_resized(paths: Sequence[Path], size: int) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """:func:`load_resized` and the stored ``(height, width)`` sizes it met."""
    decoded = [read_image(Path(p)) for p in paths]  # one-line DataError naming an unreadable file
    by_shape: dict[tuple[int, int], list[int]] = {}
    for row, image in enumerate(decoded):
        by_shape.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(row)
    out = torch.empty((len(decoded), 3, size, size), dtype=torch.uint8)
    for rows in by_shape.values():  # one resize per stored size
        out[torch.as_tensor(rows)] = resize_images(torch.stack([decoded[r] for r in rows]), size)
    return out, set(by_shape)


def load_resized(paths: Sequence[Path], size: int) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]``: each image decoded (:func:`bench.eval.formats.images.read_image`, RGB)
    and brought to ``size x size`` by :func:`bench.eval.formats.images.resize_images` (antialiased bilinear;
    an upsampling for these tiny images), images of one stored size resized together. An unreadable file is
    a one-line DataError naming it."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return _load_resized(paths, size)[0]


def _size_text(sizes: set[tuple[int, int]]) -> str:
    by_area = sorted(sizes, key=lambda hw: (hw[0] * hw[1], hw))
    low, high = by_area[0], by_area[-1]
    return (f"{len(sizes)} stored sizes from {low[0]}x{low[1]} to {high[0]}x{high[1]} (HxW)" if len(sizes) > 1
            else f"stored at {low[0]}x{low[1]} (HxW)")


# ----------------------------------------------------------------------------------------------------
# Scoring (numpy in, numpy out)
# ----------------------------------------------------------------------------------------------------


def mate_first(similarity: np.ndarray, probe_ids: np.ndarray, gallery_ids: np.ndarray) -> np.ndarray:
    """``[B, 1 + G]``: column 0 each probe's best score over its mate images, then the gallery's columns with
    the probe's own mate images lowered to :data:`MATE_FLOOR`.

    Under one label per column (column 0 the mate) :func:`bench.eval.metrics.open_set_scores` then ranks the
    best mate image among the other identities' images and the distractors: the TinyFace rule.
    """
    mates = probe_ids[:, None] == gallery_ids[None, :]
    if not mates.any(axis=1).all():
        raise ValueError("every probe needs a mate image in the gallery")
    best = np.where(mates, similarity, -np.inf).max(axis=1)
    return np.concatenate([best[:, None], np.where(mates, np.float32(MATE_FLOOR), similarity)], axis=1)


def tinyface_ranks(probe_features: np.ndarray, probe_ids: np.ndarray, gallery_features: np.ndarray,
                   gallery_ids: np.ndarray, ranks: Sequence[int] = TINYFACE_RANKS,
                   block: int = TINYFACE_PROBE_BLOCK) -> dict[int, float]:
    """``{rank: share of probes}`` under the TinyFace rule (module docstring); features are L2-normalised here,
    ``gallery_ids`` holds :data:`~bench.eval.formats.tinyface.DISTRACTOR_LABEL` for distractors."""
    probes = l2_normalise(np.asarray(probe_features, dtype=np.float32))
    gallery = l2_normalise(np.asarray(gallery_features, dtype=np.float32))
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    columns = np.arange(gallery.shape[0] + 1)
    parts = []
    for start in range(0, probes.shape[0], block):
        ids = probe_ids[start:start + block]
        scores = mate_first(probes[start:start + block] @ gallery.T, ids, gallery_ids)
        parts.append(open_set_scores(scores, np.zeros(ids.shape[0], dtype=np.int64), columns))
    return cmc_from_scores(concat_open_set(parts), ranks)


def pair_scores(features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair ``(features[i], features[j])``."""
    unit = l2_normalise(np.asarray(features, dtype=np.float32))
    return np.einsum("ij,ij->i", unit[pairs[:, 0]], unit[pairs[:, 1]])


def gallery_templates(features: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique identity ids and their templates: the L2-normalised mean of the unit image features."""
    unit = l2_normalise(np.asarray(features, dtype=np.float32))
    template_ids, index = np.unique(np.asarray(ids), return_inverse=True)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(template_ids.shape[0]))
    return template_ids, l2_normalise(np.add.reduceat(unit[order], starts, axis=0))


def at_rank(summary: OpenSetScores, rank: int) -> OpenSetScores:
    """The summary whose rank-1 test is "mate within the top ``rank``": :func:`bench.eval.metrics.tpir_from_scores`
    counts a mated probe when ``mate_score > best_nonmate`` and above the threshold, so ``best_nonmate`` becomes
    ``-inf`` (within the rank) or ``+inf`` (beyond it); the threshold rule is untouched."""
    within = np.where(summary.mate_rank <= rank, -np.inf, np.inf)
    return OpenSetScores(summary.mate_score, within, summary.mate_rank, summary.nonmated_best)


def survface_identification(probe_features: np.ndarray, probe_ids: np.ndarray, gallery_features: np.ndarray,
                            gallery_ids: np.ndarray, block: int = SURVFACE_PROBE_BLOCK) -> dict[str, Any]:
    """Open-set metrics of the probes (unmated ones with an id no gallery image has) against the gallery's
    identity templates (module docstring)."""
    template_ids, templates = gallery_templates(gallery_features, gallery_ids)
    probes = l2_normalise(np.asarray(probe_features, dtype=np.float32))
    probe_ids = np.asarray(probe_ids)
    summary = concat_open_set([open_set_scores(probes[s:s + block] @ templates.T, probe_ids[s:s + block],
                                               template_ids) for s in range(0, probes.shape[0], block)])
    ranks = cmc_from_scores(summary, SURVFACE_RANKS)
    return {
        "tpir_at_fpir": {f"{f:g}": v for f, v in tpir_from_scores(summary, SURVFACE_FPIRS).items()},
        "tpir20_at_fpir": {f"{f:g}": v for f, v in
                           tpir_from_scores(at_rank(summary, SURVFACE_TPIR_RANK), SURVFACE_FPIRS).items()},
        "rank": {str(r): v for r, v in ranks.items()}, "rank1": ranks[1],
        "num_templates": int(template_ids.shape[0]), "num_mated": summary.num_mated,
        "num_unmated": summary.num_nonmated,
    }


# ----------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------


def feature_text(flip: bool | str) -> str:
    return ("normalise(f(x) + f(flip(x)))" if flip is True else "normalise(f(x)) (no flip test)" if flip is False
            else f"normalise(features supplied by the user: {flip})")


class LowResProtocol:
    """What both protocols share: the image list in feature-row order (:meth:`read` sets ``self.paths``), the
    images resized once when they fit in :data:`IMAGE_CACHE_BYTES` (else streamed per encoder), features."""

    name: ClassVar[str]
    headline: ClassVar[str]
    #: The folder under ``<data root>/eval/`` when ``$FACEBENCH_<NAME>`` is not set.
    default_folder: ClassVar[str]

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None) -> None:
        self.options = options or EvalSettings()
        self.input_size = eval_input_size(data, input_size)
        self.folder = locate_benchmark(self.name, data, self.default_folder, kind="dir")
        self.paths: list[Path] = []
        self.read(self.folder)
        self.stored_sizes: set[tuple[int, int]] = set()
        fits = len(self.paths) * 3 * self.input_size ** 2 <= IMAGE_CACHE_BYTES
        self.images = self._load(self.paths) if fits else None

    def read(self, folder: Path) -> None:
        raise NotImplementedError

    def _load(self, paths: Sequence[Path]) -> torch.Tensor:
        images, sizes = _load_resized(paths, self.input_size)
        self.stored_sizes |= sizes
        return images

    def features(self, encoder: nn.Module, device: torch.device, batch_size: int) -> np.ndarray:
        """Features of every image, in ``self.paths`` order."""
        flip = self.options.flip
        if self.images is not None:
            return extract_features(encoder, self.images, device, batch_size=batch_size, flip=flip)
        return np.concatenate([
            extract_features(encoder, self._load(self.paths[s:s + STREAM_CHUNK]), device, batch_size=batch_size,
                             flip=flip) for s in range(0, len(self.paths), STREAM_CHUNK)])

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        return self.score_features(self.features(encoder, device, batch_size), flip=self.options.flip)

    def score_features(self, features: np.ndarray | Path | str, flip: bool | str = True) -> dict[str, Any]:
        raise NotImplementedError

    def _feature_rows(self, features: np.ndarray | Path | str, what: str) -> np.ndarray:
        if isinstance(features, (str, Path)):
            return features_file(Path(features), len(self.paths), what)
        array = np.asarray(features, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(self.paths):
            raise ValueError(f"expected features [{len(self.paths)}, D] ({what}), got shape {list(array.shape)}")
        return array

    def feature_conventions(self, flip: bool | str) -> dict[str, str]:
        out = {"feature": feature_text(flip), "score": "cosine of the unit features"}
        if isinstance(flip, bool) and self.stored_sizes:  # images embedded here
            size = f"{self.input_size}x{self.input_size}"
            out["resize"] = (f"native low-resolution images ({_size_text(self.stored_sizes)}) resized straight to "
                             f"{size} (aspect ratio not kept) with antialiased bilinear interpolation (torch "
                             f"interpolate, antialias=True): an upsampling wherever an image is smaller than {size}")
        return out


@PROTOCOLS.register("tinyface")
class TinyFaceProtocol(LowResProtocol):
    """TinyFace identification: rank-1/5/20 of the probes against Gallery_Match plus every distractor."""

    name: ClassVar[str] = "tinyface"
    headline: ClassVar[str] = "rank"
    default_folder: ClassVar[str] = "tinyface"
    FEATURE_ROWS: ClassVar[str] = "one row per probe, then per Gallery_Match image (.mat orders), then per " \
                                  "distractor (sorted paths)"

    def read(self, folder: Path) -> None:
        self.set = read_tinyface(folder)
        self.paths = self.set.probe_paths + self.set.gallery_paths + self.set.distractor_paths

    def score_features(self, features: np.ndarray | Path | str, flip: bool | str = True) -> dict[str, Any]:
        """Metrics of features in ``self.paths`` order (or a ``.npy`` holding them)."""
        rows = self._feature_rows(features, self.FEATURE_ROWS)
        s = self.set
        probes, matches = len(s.probe_paths), len(s.gallery_paths)
        gallery_ids = np.concatenate([s.gallery_ids, np.full(len(s.distractor_paths), DISTRACTOR_LABEL)])
        rates = tinyface_ranks(rows[:probes], s.probe_ids, rows[probes:], gallery_ids)
        return {
            "rank": {str(r): v for r, v in rates.items()},
            "summary": {f"rank-{r}": v for r, v in rates.items()},
            "counts": {"probes": probes, "gallery_match": matches, "distractors": len(s.distractor_paths),
                       "gallery": matches + len(s.distractor_paths),
                       "identities": int(np.unique(s.gallery_ids).shape[0])},
            "folder": str(self.folder),
            "conventions": self.conventions(flip),
        }

    def conventions(self, flip: bool | str) -> dict[str, str]:
        s = self.set
        return {
            **self.feature_conventions(flip),
            "gallery": f"distractors in the gallery: the {len(s.gallery_paths)} Gallery_Match images plus all "
                       f"{len(s.distractor_paths)} Gallery_Distractor images (labelled {DISTRACTOR_LABEL}, never a "
                       f"mate), as test_face_identification.m",
            "rank": "1 + non-mate gallery images (other identities' and distractors) scoring >= the probe's best mate "
                    "image (ties count against the probe); rank-k = share of probes with rank <= k (CMC)",
            "source": "TinyFace readme.txt (Evaluation Instruction) and Face_Identification_Evaluation/"
                      "test_face_identification.m (its Python port); ranks 1/5/20 as AdaFace validation_lq",
        }


@PROTOCOLS.register("survface")
class SurvFaceProtocol(LowResProtocol):
    """QMUL-SurvFace: verification TAR@FAR and open-set identification TPIR@FPIR and rank-1."""

    name: ClassVar[str] = "survface"
    headline: ClassVar[str] = "tpir_at_fpir"
    default_folder: ClassVar[str] = "QMUL-SurvFace"
    FEATURE_ROWS: ClassVar[str] = "one row per verification image (first appearance in the positive then " \
                                  "negative pairs), then per gallery image, mated probe (.mat orders), " \
                                  "unmated probe (sorted paths)"

    def read(self, folder: Path) -> None:
        self.verification = read_survface_verification(folder)
        self.identification = read_survface_identification(folder)
        self.paths = (self.verification.image_paths + self.identification.gallery_paths
                      + self.identification.probe_paths)

    def score_features(self, features: np.ndarray | Path | str, flip: bool | str = True) -> dict[str, Any]:
        """Metrics of features in ``self.paths`` order (or a ``.npy`` holding them)."""
        rows = self._feature_rows(features, self.FEATURE_ROWS)
        v, ident = self.verification, self.identification
        first, second = len(v.image_paths), len(v.image_paths) + len(ident.gallery_paths)
        tars = tar_at_far(pair_scores(rows[:first], v.pairs), v.issame, SURVFACE_FARS, mode=self.options.tar_read_off)
        open_set = survface_identification(rows[second:], ident.probe_ids, rows[first:second], ident.gallery_ids)
        result: dict[str, Any] = {"tar_at_far": {f"{far:g}": tar for far, tar in tars.items()}}
        result.update({key: open_set[key] for key in ("tpir_at_fpir", "tpir20_at_fpir", "rank", "rank1")})
        result["summary"] = {
            "TAR@FAR=0.001": result["tar_at_far"]["0.001"], "TAR@FAR=0.01": result["tar_at_far"]["0.01"],
            "TPIR20@FPIR=0.1": result["tpir20_at_fpir"]["0.1"], "TPIR@FPIR=0.1": result["tpir_at_fpir"]["0.1"],
            "rank-1": result["rank1"],
        }
        positives = int(np.count_nonzero(v.issame))
        result["counts"] = {
            "verification_images": first, "positive_pairs": positives,
            "negative_pairs": int(v.issame.shape[0]) - positives,
            "gallery_images": len(ident.gallery_paths), "gallery_identities": open_set["num_templates"],
            "mated_probes": open_set["num_mated"], "unmated_probes": open_set["num_unmated"],
        }
        result["folder"] = str(self.folder)
        result["conventions"] = self.conventions(flip)
        return result

    def conventions(self, flip: bool | str) -> dict[str, str]:
        read_off = ("ROC point with the nearest FPR, ties to the larger TPR" if self.options.tar_read_off == "nearest"
                    else "largest TPR with FPR <= target")
        return {
            **self.feature_conventions(flip),
            "verification": f"cosine per pair of positive_pairs_names / negative_pairs_names; TAR at FAR 0.001, 0.01, "
                            f"0.1, 0.3 ({read_off})",
            "gallery": "one template per gallery identity: the L2-normalised mean of its images' unit features (the "
                       "public Python ports' pooling; the MATLAB evaluation's is unconfirmed)",
            "identification": "open-set: mated probes (mated_probe_img_ID_pairs.mat) and unmated probes "
                              "(unmated_probe/); rank of the mate = 1 + non-mate templates scoring >= it; threshold = "
                              "the max(floor(N_unmated x FPIR) - 1, 0)-th largest unmated best score; "
                              "tpir20_at_fpir: mate within the top 20 and above it (the paper's TPIR20@FPIR); "
                              "tpir_at_fpir: mate at rank 1 and above it (insightface ijb_evals.py rule)",
            "source": "QMUL-SurvFace readme.txt and paper (arXiv 1804.09691, protocols page qmul-survface.github.io)",
        }
