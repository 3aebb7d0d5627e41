"""IJB-B / IJB-C template-based verification (1:1) and open-set identification (1:N), and ``synth-ijbc``.

The files are read by :mod:`bench.eval.formats.ijb_meta` (the layout is described there).

Default mode, as insightface's recognition/arcface_torch/eval_ijbc.py (its reported numbers):

1. each face is aligned to 112 x 112 by the least-squares similarity (Umeyama) from its 5 landmarks to
   the ArcFace template (:mod:`bench.eval.align`), then resized to the model's input size if different;
2. image feature = ``f(x) + f(flip x)``, **not** normalised (its norm acts as a quality weight), times the
   detector score ("N1 D1 F2" in insightface's naming; ``use_norm_score=True`` there means *no*
   normalisation). The switches are :class:`bench.config.EvalSettings` fields ``flip``,
   ``ijb_normalize_images`` and ``ijb_detector_score``, recorded in every result;
3. template feature: mean of the image features within each media (a video's frames, or one still),
   sum over the template's medias, L2-normalised (:func:`template_features`);
4. 1:1: cosine similarity per pair (:func:`score_pairs`, blocked matrix products, never a pairs x dim
   matrix); TAR at FAR 1e-6 .. 1e-1 read off the ROC at the nearest FPR (:func:`bench.eval.metrics.tar_at_far`);
5. 1:N: each gallery (G1 and G2; IJB-B S1 and S2) against the probe_mixed templates, open-set: probes
   whose subject is enrolled in that gallery are mated, the others non-mated; rank-1/5/10 over mated
   probes and TPIR at FPIR 1e-2 and 1e-1 (:mod:`bench.eval.metrics`, insightface ijb_evals.py's fixed
   rule), then the mean of the two galleries. This is **not** the figure of insightface's old
   ``ijb_1n.py``, which merges G1 and G2 into one closed-set gallery and thresholds on all impostor
   similarities (a "TPIR@FAR" that is neither FPIR nor rank-aware; see insightface PRs #1386, #1739).
   Without any of the 1:N CSVs (the original IJB meta lacks them) 1:N is skipped with a warning on stderr
   naming the paths looked for; with only some of them it is an error naming the first missing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.eval import PROTOCOLS, eval_input_size, features_file, locate_benchmark
from bench.eval.align import ALIGNED_SIZE, align_faces
from bench.eval.features import extract_features
from bench.eval.formats.ijb_meta import IJBMeta, read_ijb
from bench.eval.formats.images import read_array, resize_images, stack_arrays
from bench.eval.metrics import (
    OpenSetScores,
    cmc_from_scores,
    concat_open_set,
    compact_roc,
    open_set_scores,
    read_tar,
    roc,
    tpir_from_scores,
    validate_rates,
)

#: TAR@FAR targets of eval_ijbc.py.
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IJB_RANKS = (1, 5, 10)
IJB_FPIRS = (1e-2, 1e-1)
#: Template rows per block in :func:`score_pairs` (a dense block product is rows x templates float32).
SCORE_BLOCK_ROWS = 1024
#: Share of a block's row x column rectangle that its pairs must cover for a dense matrix product to beat
#: sampled dot products (about 1/8 on the 2-core CPU: a GEMM runs about 8x more flop/s than sampled_addmm).
GEMM_DENSITY = 0.125
#: Probe templates per block in 1:N scoring.
PROBE_BLOCK = 4096
#: Aligned images kept in memory between encoders when they fit (bytes); larger sets are re-read per encoder.
IMAGE_CACHE_BYTES = 1 << 30
#: Images decoded, aligned and embedded per chunk when streaming.
STREAM_CHUNK = 2048


# ----------------------------------------------------------------------------------------------------
# Pooling and pair scoring (numpy in, numpy out)
# ----------------------------------------------------------------------------------------------------


def template_features(image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      detector_scores: np.ndarray | None = None,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique template ids and their L2-normalised features (float32 ``[T, D]``).

    Per image: optionally L2-normalised, then multiplied by its detector score when given; per media of a
    template: the mean of its images; per template: the sum over its medias, then L2-normalised (a zero
    template stays zero, as sklearn's ``normalize``). insightface eval_ijbc.py ``image2template_feature``.
    """
    from scipy import sparse

    features = np.asarray(image_features, dtype=np.float32)
    templates, medias = np.asarray(templates), np.asarray(medias)
    count = features.shape[0] if features.ndim == 2 else -1
    if features.ndim != 2 or templates.shape != (count,) or medias.shape != (count,):
        raise ValueError(f"expected image features [N, D] with templates and medias [N], got {features.shape}, "
                         f"{templates.shape} and {medias.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("image features contain NaN or infinite values")
    if normalize_images:
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        features = features / np.where(norms > 0, norms, 1.0)
    if detector_scores is not None:
        scores = np.asarray(detector_scores, dtype=np.float32)
        if scores.shape != (count,) or not np.all(np.isfinite(scores)):
            raise ValueError(f"detector scores must be {count} finite numbers, got shape {scores.shape}")
        features = features * scores[:, None]
    template_ids, template_index = np.unique(templates, return_inverse=True)
    media_ids, media_index = np.unique(medias, return_inverse=True)
    group_key = template_index.astype(np.int64) * media_ids.shape[0] + media_index
    _, group_index, group_size = np.unique(group_key, return_inverse=True, return_counts=True)
    # One sparse row per template: weight 1 / (images in the image's media) -> sum over medias of media means
    weights = sparse.csr_matrix((1.0 / group_size[group_index].astype(np.float32),
                                 (template_index, np.arange(count))), shape=(template_ids.shape[0], count))
    pooled = np.asarray(weights @ features, dtype=np.float32)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return template_ids, pooled / np.where(norms > 0, norms, 1.0)


def _template_index(template_ids: np.ndarray, queries: np.ndarray, what: str) -> np.ndarray:
    """Row of each query template id (a dense lookup table for compact non-negative ids, else a search)."""
    template_ids, queries = np.asarray(template_ids), np.asarray(queries)
    if template_ids.ndim != 1 or np.any(template_ids[1:] <= template_ids[:-1]):
        raise ValueError("template_ids must be sorted and unique (as template_features returns them)")
    if queries.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(min(template_ids[0], queries.min())), int(max(template_ids[-1], queries.max()))
    if low >= 0 and high < max(16 * template_ids.shape[0], 1 << 20):
        table = np.full(high + 1, -1, dtype=np.int64)
        table[template_ids] = np.arange(template_ids.shape[0])
        index = table[queries]
    else:
        index = np.searchsorted(template_ids, queries)
        index[index >= template_ids.shape[0]] = 0
        index[template_ids[index] != queries] = -1
    missing = index < 0
    if missing.any():
        raise ValueError(f"{what} references template {queries[missing][0]}, which has no features "
                         f"({int(missing.sum())} such pairs)")
    return index


def score_pairs(template_ids: np.ndarray, template_features_: np.ndarray, t1: np.ndarray,
                t2: np.ndarray, block_rows: int = SCORE_BLOCK_ROWS) -> np.ndarray:
    """Cosine similarity (dot product of the normalised template features) of each pair ``(t1[k], t2[k])``.

    Never builds a pairs x dim matrix. Each pair is taken as (smaller, larger) template row (the scores are
    symmetric) and the pairs are grouped by their smaller row (a linear-time radix sort). Per block of
    ``block_rows`` rows: where the block's pairs cover at least :data:`GEMM_DENSITY` of its row x column
    rectangle, one matrix product of the block with the columns it needs, then a gather; elsewhere
    ``torch.sparse.sampled_addmm`` computes just the sampled dot products (CSR, the block's rows against
    all templates). Memory: the block's product, or the pairs' indices and scores.
    """
    features = np.ascontiguousarray(template_features_, dtype=np.float32)
    t1, t2 = np.asarray(t1).ravel(), np.asarray(t2).ravel()
    if t1.shape != t2.shape:
        raise ValueError(f"t1 and t2 must have equal length, got {t1.shape} and {t2.shape}")
    if features.ndim != 2 or features.shape[0] != np.asarray(template_ids).shape[0]:
        raise ValueError(f"template features {features.shape} do not match {np.asarray(template_ids).shape[0]} ids")
    index1, index2 = _template_index(template_ids, t1, "t1"), _template_index(template_ids, t2, "t2")
    num_templates = features.shape[0]
    low = np.minimum(index1, index2)
    high = np.maximum(index1, index2)
    del index1, index2
    key = low.astype(np.uint16) if num_templates <= 65536 else low
    order = np.argsort(key, kind="stable")  # radix sort for 16-bit keys
    del key
    row_start = np.concatenate([[0], np.cumsum(np.bincount(low, minlength=num_templates))])
    columns = high[order]
    del high
    sorted_scores = np.empty(t1.shape[0], dtype=np.float32)
    tensor = torch.from_numpy(features)
    for first in range(0, num_templates, block_rows):
        last = min(first + block_rows, num_templates)
        begin, end = int(row_start[first]), int(row_start[last])
        if begin == end:
            continue
        block_columns = columns[begin:end]
        stop_column = int(block_columns.max()) + 1
        if (end - begin) >= GEMM_DENSITY * (last - first) * (stop_column - first):
            product = tensor[first:last] @ tensor[first:stop_column].T
            rows = low[order[begin:end]] - first
            sorted_scores[begin:end] = product.numpy()[rows, block_columns - first]
        else:
            sorted_scores[begin:end] = _sampled_dot(tensor, first, last, row_start[first:last + 1] - begin,
                                                    block_columns)
    scores = np.empty_like(sorted_scores)
    scores[order] = sorted_scores
    return scores


def _sampled_dot(features: torch.Tensor, first: int, last: int, row_start: np.ndarray,
                 columns: np.ndarray) -> np.ndarray:
    """Dot products of rows ``first..last`` with the CSR-listed columns (``torch.sparse.sampled_addmm``)."""
    import warnings

    with warnings.catch_warnings():
        # torch flags every CSR tensor as a beta feature; the computation is a documented, stable op.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(torch.from_numpy(row_start.astype(np.int64)),
                                          torch.from_numpy(columns.astype(np.int64)),
                                          torch.zeros(columns.shape[0], dtype=features.dtype),
                                          size=(last - first, features.shape[0]), check_invariants=False)
        product = torch.sparse.sampled_addmm(pattern, features[first:last], features.T, beta=0.0, alpha=1.0)
    return product.values().numpy()


# ----------------------------------------------------------------------------------------------------
# Metrics from template features
# ----------------------------------------------------------------------------------------------------


def verification_11(meta: IJBMeta, template_ids: np.ndarray, features: np.ndarray,
                    read_off: str = "nearest") -> dict[str, Any]:
    scores = score_pairs(template_ids, features, meta.t1, meta.t2)
    fpr, tpr, _ = roc(scores, meta.pair_labels)  # once, for the read-offs and the compact ROC
    tars = {far: read_tar(fpr, tpr, far, read_off) for far in validate_rates(IJB_FARS)}
    genuine = int(np.count_nonzero(meta.pair_labels))
    return {"tar_at_far": {f"{far:g}": tar for far, tar in tars.items()}, "num_pairs": int(scores.shape[0]),
            "num_genuine": genuine, "num_impostor": int(scores.shape[0]) - genuine,
            "roc": compact_roc(fpr, tpr, int(scores.shape[0]) - genuine)}


def _lookup(template_ids: np.ndarray, features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return features[_template_index(template_ids, ids, "1:N list")]


def identification_1n(meta: IJBMeta, template_ids: np.ndarray, features: np.ndarray) -> dict[str, Any]:
    """Per-gallery open-set metrics against probe_mixed, and their mean."""
    assert meta.galleries is not None and meta.probes is not None
    probe_ids, probe_subjects = meta.probes
    probe_features = _lookup(template_ids, features, probe_ids)
    out: dict[str, Any] = {}
    for gallery, (gallery_ids, gallery_subjects) in meta.galleries.items():
        gallery_features = _lookup(template_ids, features, gallery_ids)
        parts: list[OpenSetScores] = []
        for start in range(0, probe_ids.shape[0], PROBE_BLOCK):
            block = probe_features[start:start + PROBE_BLOCK] @ gallery_features.T
            parts.append(open_set_scores(block, probe_subjects[start:start + PROBE_BLOCK], gallery_subjects))
        summary = concat_open_set(parts)
        out[gallery] = {
            "rank": {str(r): v for r, v in cmc_from_scores(summary, IJB_RANKS).items()},
            "tpir_at_fpir": {f"{f:g}": v for f, v in tpir_from_scores(summary, IJB_FPIRS).items()},
            "num_gallery": int(gallery_ids.shape[0]), "num_mated": summary.num_mated,
            "num_nonmated": summary.num_nonmated,
        }
    galleries = list(meta.galleries)
    out["mean"] = {
        key: {k: float(np.mean([out[g][key][k] for g in galleries])) for k in out[galleries[0]][key]}
        for key in ("rank", "tpir_at_fpir")
    }
    return out


# ----------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------


class IJBProtocol:
    """IJB-B / IJB-C 1:1 and 1:N from one feature pass over the aligned images."""

    name: ClassVar[str]
    headline: ClassVar[str] = "tar_at_far"
    #: File prefix and folder name: ``ijbc`` -> ``IJBC/meta/ijbc_*``.
    target: ClassVar[str] = "ijbc"

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None) -> None:
        self.options = options or EvalSettings()
        self.input_size = eval_input_size(data, input_size)
        self.progress = progress
        self.meta = read_ijb(self.locate(data, progress), self.target)
        per_image = 3 * self.input_size * self.input_size
        self.images = self._load_images(0, self.meta.num_images) \
            if self.meta.num_images * per_image <= IMAGE_CACHE_BYTES else None

    def locate(self, data: DataSettings, progress: bool) -> Path:
        return locate_benchmark(self.name, data, self.target.upper(), kind="dir")

    def _load_images(self, start: int, stop: int) -> torch.Tensor:
        """Decoded, aligned and resized images ``start..stop`` (in the landmark file's order)."""
        crops = self.meta.root / "loose_crop"
        out = torch.empty((stop - start, 3, self.input_size, self.input_size), dtype=torch.uint8)
        for first in range(start, stop, STREAM_CHUNK):
            last = min(first + STREAM_CHUNK, stop)
            decoded = [read_array(crops / name) for name in self.meta.names[first:last]]
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for offset, image in enumerate(decoded):
                by_shape.setdefault(image.shape, []).append(offset)
            for offsets in by_shape.values():  # loose crops differ in size; align each size as one batch
                rows = np.asarray(offsets) + first
                aligned = align_faces(stack_arrays([decoded[k] for k in offsets]), self.meta.landmarks[rows],
                                      ALIGNED_SIZE)
                out[torch.from_numpy(rows - start)] = resize_images(aligned, self.input_size)
        return out

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        flip = self.options.flip
        if self.images is not None:
            features = extract_features(encoder, self.images, device, batch_size=batch_size, flip=flip)
        else:
            features = np.concatenate([
                extract_features(encoder, self._load_images(s, min(s + STREAM_CHUNK, self.meta.num_images)),
                                 device, batch_size=batch_size, flip=flip)
                for s in range(0, self.meta.num_images, STREAM_CHUNK)])
        return self.score_features(features, flip=flip)

    def score_features(self, features: np.ndarray | Path, flip: bool | str = True) -> dict[str, Any]:
        """Metrics of image features ``[N, D]`` in the landmark file's order (or a ``.npy`` holding them)."""
        if isinstance(features, (str, Path)):
            features = features_file(Path(features), self.meta.num_images,
                                     f"one row per line of {self.target}_name_5pts_score.txt")
        o = self.options
        template_ids, pooled = template_features(
            features, self.meta.templates, self.meta.medias,
            self.meta.detector_scores if o.ijb_detector_score else None, o.ijb_normalize_images)
        result: dict[str, Any] = {"1:1": verification_11(self.meta, template_ids, pooled, o.tar_read_off)}
        result["tar_at_far"] = result["1:1"]["tar_at_far"]
        if self.meta.galleries is not None:
            result["1:N"] = identification_1n(self.meta, template_ids, pooled)
        else:
            result["1:N"] = f"skipped: none of {', '.join(self.meta.one_n_files)} exists"
        result["summary"] = self.summary(result)
        result["num_images"], result["num_templates"] = self.meta.num_images, int(template_ids.shape[0])
        result["folder"] = str(self.meta.root)
        generated = _generation_info(self.meta.root)
        if generated is not None:
            result["generated"] = generated
        result["conventions"] = self.conventions(flip)
        return result

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, float]:
        tars = result["1:1"]["tar_at_far"]
        out = {"TAR@FAR=1e-4": tars["0.0001"], "TAR@FAR=1e-5": tars["1e-05"]}
        if isinstance(result["1:N"], dict):
            out["rank-1"] = result["1:N"]["mean"]["rank"]["1"]
        return out

    def conventions(self, flip: bool | str) -> dict[str, str]:
        o = self.options
        image_feature = ("f(x) + f(flip(x))" if flip is True else "f(x) (no flip test)" if flip is False
                         else f"features supplied by the user ({flip})")
        if o.ijb_normalize_images:
            image_feature = f"normalise({image_feature})"
        if o.ijb_detector_score:
            image_feature += " x detector score"
        mode = ("N0" if o.ijb_normalize_images else "N1") + ("D1" if o.ijb_detector_score else "D0") + \
            ("F2" if flip is True else "F0" if flip is False else "F?")
        return {
            "alignment": "Umeyama similarity from the 5 landmarks to the ArcFace 112x112 template, bilinear warp, "
                         "zero border" + (f", then resized to {self.input_size}x{self.input_size} with antialiasing"
                                          if self.input_size != ALIGNED_SIZE else ""),
            "image_feature": image_feature,
            "mode": f"{mode} (insightface naming; its eval_ijbc default is N1D1F2)",
            "template_feature": "mean within each media, sum over medias, L2-normalised",
            "score": "cosine of template features",
            "tar_read_off": ("ROC point with the nearest FPR, ties to the larger TPR (insightface eval_ijbc)"
                             if o.tar_read_off == "nearest" else "largest TPR with FPR <= target"),
            "1:N": "open-set per gallery vs probe_mixed, then the mean of the galleries; rank of the mate = 1 + "
                   "non-mates scoring >= the mate; TPIR@FPIR threshold = the max(floor(N_nonmated * FPIR) - 1, 0)-th "
                   "largest non-mated best score, hit = mate at rank 1 and above it (insightface ijb_evals.py); "
                   "not the merged-gallery figure of insightface's old ijb_1n.py",
            "source": "insightface recognition/arcface_torch/eval_ijbc.py (1:1), "
                      "recognition/_evaluation_/ijb/ijb_evals.py (1:N)",
        }


for _target in ("ijbb", "ijbc"):
    PROTOCOLS.register(_target, type(f"IJB_{_target}", (IJBProtocol,), {
        "name": _target, "target": _target,
        "__doc__": f"{_target.upper()} 1:1 (TAR@FAR) and 1:N (rank-N, TPIR@FPIR) from insightface's IJB package.",
    }))


@PROTOCOLS.register("synth-ijbc")
class SynthIJBC(IJBProtocol):
    """IJB-C-style templates of held-out SynthFace identities, written as a real IJB-C folder (see
    :mod:`bench.eval.synth_benchmarks` for its sizes)."""

    name: ClassVar[str] = "synth-ijbc"
    target: ClassVar[str] = "ijbc"

    def locate(self, data: DataSettings, progress: bool) -> Path:
        from bench.eval.synth_benchmarks import SYNTH_IJBC, ensure_synth_ijbc

        return ensure_synth_ijbc(data, SYNTH_IJBC, progress)


def _generation_info(folder: Path) -> dict | None:
    from bench.eval.synth_benchmarks import generation_info

    return generation_info(folder)
