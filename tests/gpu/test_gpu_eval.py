"""IJB-C-sized 1:1 and MegaFace-sized 1:N evaluation from CUDA-extracted features equal the CPU results
(issue 19).

Scoring is CPU code. :func:`bench.eval.ijb.template_features`, :func:`bench.eval.ijb.score_pairs` and
:func:`bench.eval.megaface.rank_accuracy` (with its :class:`~bench.eval.megaface.DistractorScorer`) take
numpy arrays and no device: they run on the CPU whichever device ``bench run`` trains on. What runs on
CUDA in an evaluation is the encoder (:func:`bench.eval.features.extract_features` on the device). So
these checks compare the features of one encoder extracted on CUDA and on the CPU, and the IJB-C-sized
and MegaFace-sized results scored (on the CPU) from each.

- Encoder: the GPU preset's backbone (r50, 112 x 112, embedding 512), random weights from a fixed seed,
  BatchNorm statistics calibrated on the images (one pass in train mode with cumulative averages; an
  uncalibrated random IResNet-50 gives infinite features in eval mode). Images: rendered SynthFace faces of
  the evaluation namespace, ``eval_identities x eval_images_per_identity``, flip test on.
- Features on CUDA, two ways: ``float32`` (TF32 off for convolutions and matrix products) and ``default``
  (torch's defaults, as ``bench run`` evaluates; cuDNN convolutions may use TF32 there).
- IJB-C-sized 1:1: ``ijbc_templates`` templates of two medias (two images of one identity), pooled by
  ``template_features``; ``ijbc_pairs`` random template pairs scored by ``score_pairs``; TAR at FAR 1e-4,
  1e-3, 1e-2 (genuine: the two templates show one identity).
- MegaFace-sized 1:N: ``megaface_probes`` probes (an image's feature plus a random mixture of the others)
  against ``megaface_distractors`` distractors (random mixtures of the features, drawn chunk by chunk, the
  same draws for every feature set); rank-1 under the MegaFace rule.

Asserted (what breaks them: a CUDA encoder path that computes something else, e.g. a wrong cuDNN
algorithm, a layer in another precision, BatchNorm in training mode, flip not applied on the device):
per image ``|f_cuda - f_cpu| / |f_cpu|`` at most 1e-3 in float32 and 2e-2 by default (TF32); per pair
``|s_cuda - s_cpu| <= |u1_cuda - u1_cpu| + |u2_cuda - u2_cpu|`` for the unit template features u
(Cauchy-Schwarz: the scoring adds no device-dependent error of its own); TAR@FAR and rank-1 from the
float32 CUDA features within 0.5 percentage points of the CPU's (``bench check``'s default accuracy
tolerance). The IJB-C-sized TAR@FAR from the default (TF32) features is recorded, not asserted: it
measures TF32's precision cost, which is a setting, not a bug.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from bench.backbones import build_backbone
from bench.check import Tolerances
from bench.data.loader import normalise
from bench.data.synth_trainset import EVAL_NAMESPACE
from bench.eval.features import extract_features
from bench.eval.ijb import score_pairs, template_features
from bench.eval.megaface import rank_accuracy
from bench.eval.metrics import tar_at_far
from tests.gpu.gpu_settings import GpuSizes, gpu_preset, render_faces

FEATURE_TOLERANCE = {"float32": 1e-3, "default": 2e-2}
FARS = (1e-4, 1e-3, 1e-2)
#: Percentage points a metric may move between CPU and CUDA features: ``bench check``'s default.
METRIC_TOLERANCE_PP = Tolerances().max_accuracy_drop
#: Scale of the random mixture added to a probe's own image feature (relative to a feature's norm).
PROBE_NOISE = 0.5


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products inside the block (restored after)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def calibrated_encoder(sizes: GpuSizes, images: torch.Tensor, device: torch.device) -> nn.Module:
    """The preset's backbone from seed 0 with BatchNorm running statistics set to those of ``images``."""
    torch.manual_seed(0)
    encoder = build_backbone(sizes.backbone, embedding_size=sizes.embedding_size, input_size=sizes.image_size)
    for module in encoder.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one pass, the pass's statistics
    encoder.to(device).train()
    with torch.no_grad():
        encoder(normalise(images.to(device)))
    return encoder.eval()


@pytest.fixture(scope="module")
def faces(sizes: GpuSizes) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = render_faces(sizes.eval_identities, sizes.eval_images_per_identity, sizes.image_size,
                                  EVAL_NAMESPACE)
    return images, labels.numpy()


@pytest.fixture(scope="module")
def features(faces, sizes: GpuSizes, device: torch.device) -> dict[str, np.ndarray]:
    """Features of the faces: ``cpu`` (the reference), ``float32`` and ``default`` on the device."""
    images, _ = faces
    batch = gpu_preset().eval.batch_size
    encoder = calibrated_encoder(sizes, images, device)
    cpu_encoder = copy.deepcopy(encoder).cpu()
    out = {"cpu": extract_features(cpu_encoder, images, torch.device("cpu"), batch_size=batch)}
    out["default"] = extract_features(encoder, images, device, batch_size=batch)
    with strict_float32():
        out["float32"] = extract_features(encoder, images, device, batch_size=batch)
    return out


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_encoder_features_on_device_equal_cpu(features, record) -> None:
    reference = features["cpu"]
    assert np.all(np.isfinite(reference)) and np.linalg.norm(reference, axis=1).min() > 0
    errors = {mode: float((np.linalg.norm(features[mode] - reference, axis=1)
                           / np.linalg.norm(reference, axis=1)).max()) for mode in FEATURE_TOLERANCE}
    record("eval/features", {"images": reference.shape[0], "max_relative_error": errors,
                             "tolerance": FEATURE_TOLERANCE})
    for mode, tolerance in FEATURE_TOLERANCE.items():
        assert errors[mode] <= tolerance, f"{mode} features differ from the CPU's by {errors[mode]:.2e}"


def _ijbc_sized_templates(labels: np.ndarray, sizes: GpuSizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per template image rows (two images of the template's identity, one per media), the template and
    media id of each row, and each template's identity."""
    rng = np.random.default_rng(0)
    identity = np.arange(sizes.ijbc_templates) % sizes.eval_identities
    per_identity = sizes.eval_images_per_identity
    picks = identity[:, None] * per_identity + rng.integers(0, per_identity, size=(sizes.ijbc_templates, 2))
    templates = np.repeat(np.arange(sizes.ijbc_templates), 2)
    medias = np.arange(2 * sizes.ijbc_templates)
    assert np.array_equal(labels[picks[:, 0]], identity)
    return picks.ravel(), np.stack([templates, medias]), identity


def test_ijbc_sized_verification_from_device_features(features, faces, sizes: GpuSizes, record) -> None:
    rows, (templates, medias), identity = _ijbc_sized_templates(faces[1], sizes)
    rng = np.random.default_rng(1)
    t1 = rng.integers(0, sizes.ijbc_templates, size=sizes.ijbc_pairs)
    t2 = rng.integers(0, sizes.ijbc_templates, size=sizes.ijbc_pairs)
    genuine = identity[t1] == identity[t2]
    units, scores, tars = {}, {}, {}
    for mode in ("cpu", "float32", "default"):
        ids, units[mode] = template_features(features[mode][rows], templates, medias)
        scores[mode] = score_pairs(ids, units[mode], t1, t2)
        tars[mode] = tar_at_far(scores[mode], genuine, FARS)
    shifts = {mode: np.linalg.norm(units[mode] - units["cpu"], axis=1) for mode in ("float32", "default")}
    excess = {mode: float((np.abs(scores[mode] - scores["cpu"]) - shifts[mode][t1] - shifts[mode][t2]).max())
              for mode in shifts}
    record("eval/ijbc_sized_1to1", {
        "templates": sizes.ijbc_templates, "pairs": sizes.ijbc_pairs, "genuine_pairs": int(genuine.sum()),
        "tar_at_far": {mode: {str(far): tar for far, tar in value.items()} for mode, value in tars.items()},
        "max_score_error": {mode: float(np.abs(scores[mode] - scores["cpu"]).max()) for mode in shifts},
        "max_score_error_beyond_feature_bound": excess})

    for mode, value in excess.items():
        assert value <= 1e-5, f"{mode}: a pair score moved {value:.2e} beyond what its features allow"
    for far in FARS:
        moved = 100 * abs(tars["float32"][far] - tars["cpu"][far])
        assert moved <= METRIC_TOLERANCE_PP, f"TAR@FAR={far:g} moved {moved:.2f} pp with float32 CUDA features"


class MixedRows:
    """``rows x D`` rows, each a random mixture of ``basis``'s rows, drawn per slice from ``(seed, start)``:
    a MegaFace-sized distractor set that is never in memory whole and is the same for every basis."""

    ndim = 2

    def __init__(self, basis: np.ndarray, rows: int, seed: int) -> None:
        self.basis, self.rows, self.seed = basis, rows, seed

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.basis.shape[1]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.rows)
        weights = np.random.default_rng([self.seed, start]).standard_normal((stop - start, self.basis.shape[0]),
                                                                            dtype=np.float32)
        return weights @ self.basis / math.sqrt(self.basis.shape[0])


def _megaface_sized_probes(basis: np.ndarray, labels: np.ndarray, sizes: GpuSizes) -> tuple[np.ndarray, np.ndarray]:
    """Probe features (an image's feature plus a random mixture of all, the same draws for every basis)."""
    rng = np.random.default_rng(2)
    own = rng.integers(0, basis.shape[0], size=sizes.megaface_probes)
    mixture = rng.standard_normal((sizes.megaface_probes, basis.shape[0]), dtype=np.float32) @ basis
    return basis[own] + PROBE_NOISE * mixture / math.sqrt(basis.shape[0]), labels[own]


def test_megaface_sized_identification_from_device_features(features, faces, sizes: GpuSizes, record) -> None:
    rank1 = {}
    for mode in ("cpu", "float32"):  # not "default": each pass scores 3.5G probe-distractor pairs
        probes, probe_labels = _megaface_sized_probes(features[mode], faces[1], sizes)
        distractors = MixedRows(features[mode], sizes.megaface_distractors, seed=3)
        rank1[mode] = rank_accuracy(probes, probe_labels, distractors, ranks=(1,))[1]
    record("eval/megaface_sized_1toN", {"probes": sizes.megaface_probes, "distractors": sizes.megaface_distractors,
                                        "rank1": rank1})

    assert 0.0 < rank1["cpu"] < 1.0, "the case must be neither trivial nor hopeless to compare anything"
    moved = 100 * abs(rank1["float32"] - rank1["cpu"])
    assert moved <= METRIC_TOLERANCE_PP, f"rank-1 moved {moved:.2f} pp with float32 CUDA features"
