"""SynthFace benchmarks of degraded faces, in the real low-resolution benchmarks' layouts.

Both render identities of SynthFace's evaluation namespace that no other benchmark uses (``synth-lowres``
from 400,000, its distractors from 450,000, ``synth-quality`` from 500,000 and its unrecognizable
reference from 550,000) and write folders that the TinyFace and QMUL-SurvFace readers
(:mod:`bench.eval.formats.tinyface`, :mod:`bench.eval.formats.survface`) read unchanged.

- ``synth-lowres`` (:func:`ensure_synth_lowres`): each subject has one high-resolution (HR) gallery image
  and two probe images; distractor identities add HR images to the gallery. For every probe resolution
  ``r`` the probes are brought down to ``r x r`` px with antialiasing and stored at that native size, as
  TinyFace and SurvFace store their faces (the protocol resizes them back to the model's input):
  ``px<r>/tinyface``: a TinyFace layout (Probe = the LR probes, Gallery_Match = the HR images,
  Gallery_Distractor = the distractors), ``px<r>/hr-lr`` and ``px<r>/lr-lr``: SurvFace verification layouts
  (HR gallery image against an LR probe; LR probe against LR probe), and ``hr/tinyface`` the same
  identification with the probes at full resolution (the reference).
- ``synth-quality`` (:func:`ensure_synth_quality`): ``images_per_subject`` images of each subject, each
  degraded by ONE nuisance of :data:`QUALITY_NUISANCES` at a strength ``t`` drawn uniformly in [0, 1]
  (everything else neutral: frontal, evenly lit, sharp), as a SurvFace verification layout (every genuine
  pair, and random impostor pairs) plus ``degradation.csv`` (image name, nuisance, strength): the truth
  that no real dataset has. ``ui/<identity>.png`` holds the images that define the unrecognizable-identity
  centre for ERS (other identities at :data:`UI_RESOLUTION_PX` px).

Strength ``t`` of each nuisance (ours; at ``t = 1`` each makes most faces unrecognizable at 32 px):
resolution ``S - t (S - 4)`` px; gaussian blur sigma ``8 t`` (112-frame px; the training draws reach 2.8);
sensor noise ``40 t`` grey levels (training: up to 6); JPEG quality ``95 - 75 t`` (steps of 5); occlusion of
the lowest ``70 t`` % of the image rows by mid grey; yaw ``75 t`` degrees (SynthFace's limit), either side.

Folders are cached like the other synthetic benchmarks (keyed by the sizes and this module's source) and
created atomically.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import DataSettings
from bench.data.synth_trainset import EVAL_NAMESPACE
from bench.data.synthface import JPEG_QUALITY_STEP, Nuisance, SynthFace
from bench.eval.formats.images import to_hwc, write_image
from bench.eval.formats.survface import write_survface_verification
from bench.eval.formats.tinyface import write_tinyface
from bench.eval.synth_benchmarks import _materialise, _synth, benchmark_folder

LOWRES_OFFSET = 400_000
LOWRES_DISTRACTOR_OFFSET = 450_000
QUALITY_OFFSET = 500_000
UI_OFFSET = 550_000
#: Side of the images that define the unrecognizable-identity centre (ours: "unrecognizable" at any input).
UI_RESOLUTION_PX = 4
#: The nuisances of synth-quality, each at a strength t in [0, 1] (module docstring).
QUALITY_NUISANCES = ("resolution", "blur", "noise", "jpeg", "occlusion", "pose")
MIN_RESOLUTION_PX = 4
MAX_BLUR_SIGMA_112 = 8.0
MAX_NOISE_STD = 40.0
JPEG_QUALITY_AT = (95, 20)
MAX_OCCLUDED_ROWS = 0.7
MAX_YAW_DEG = 75.0
OCCLUDER_GREY = 128


@dataclass(frozen=True)
class SynthLowResSizes:
    subjects: int = 300
    probes_per_subject: int = 2
    distractors: int = 1000
    resolutions: tuple[int, ...] = (8, 12, 16, 20)
    #: Impostor pairs per genuine pair in the verification lists.
    impostors_per_genuine: int = 10
    seed: int = 0


@dataclass(frozen=True)
class SynthQualitySizes:
    subjects: int = 300
    images_per_subject: int = 4
    impostor_pairs: int = 30_000
    ui_images: int = 300
    seed: int = 0


SYNTH_LOWRES = SynthLowResSizes()
SYNTH_QUALITY = SynthQualitySizes()


def downsample(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` brought down to ``pixels x pixels`` with antialiasing (bilinear), uint8."""
    if images.shape[-1] == pixels:
        return images
    small = F.interpolate(images.float(), size=(pixels, pixels), mode="bilinear", align_corners=False,
                          antialias=True)
    return small.round_().clamp_(0, 255).to(torch.uint8)


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images back to ``size x size`` (bilinear), as a model's input pipeline would."""
    if images.shape[-1] == size:
        return images
    big = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return big.round_().clamp_(0, 255).to(torch.uint8)


def verification_pairs(first: np.ndarray, second: np.ndarray, subjects_first: np.ndarray,
                       subjects_second: np.ndarray, impostors: int, rng: np.random.Generator
                       ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Genuine pairs ``(first[i], second[j])`` of equal subject, and ``impostors`` random pairs of different
    subjects (no pair twice)."""
    positive = [(int(a), int(b)) for a, sa in zip(first, subjects_first)
                for b, sb in zip(second, subjects_second) if sa == sb and a != b]
    negative: set[tuple[int, int]] = set()
    while len(negative) < impostors:
        i, j = int(rng.integers(len(first))), int(rng.integers(len(second)))
        if subjects_first[i] != subjects_second[j]:
            negative.add((int(first[i]), int(second[j])))
    return positive, sorted(negative)


# ----------------------------------------------------------------------------------------------------
# synth-lowres
# ----------------------------------------------------------------------------------------------------


def ensure_synth_lowres(data: DataSettings, sizes: SynthLowResSizes = SYNTH_LOWRES, progress: bool = True) -> Path:
    """The synth-lowres folder (generated on first use; module docstring)."""
    folder = benchmark_folder(data, "synth-lowres", sizes, __name__)

    def build(tmp: Path) -> dict:
        synth = _synth(data)
        size = synth.config.image_size
        subjects = np.arange(LOWRES_OFFSET, LOWRES_OFFSET + sizes.subjects)
        k = sizes.probes_per_subject
        gallery = synth.render_many(torch.as_tensor(subjects), torch.zeros(sizes.subjects, dtype=torch.long),
                                    EVAL_NAMESPACE, progress=progress, description="rendering synth-lowres gallery")
        probe_subjects = np.repeat(subjects, k)
        probe_samples = np.tile(np.arange(1, k + 1), sizes.subjects)
        probes = synth.render_many(torch.as_tensor(probe_subjects), torch.as_tensor(probe_samples), EVAL_NAMESPACE,
                                   progress=progress, description="rendering synth-lowres probes").images
        distractor_ids = np.arange(LOWRES_DISTRACTOR_OFFSET, LOWRES_DISTRACTOR_OFFSET + sizes.distractors)
        distractors = synth.render_many(torch.as_tensor(distractor_ids),
                                        torch.zeros(sizes.distractors, dtype=torch.long), EVAL_NAMESPACE,
                                        progress=progress, description="rendering synth-lowres distractors").images
        gallery_hwc, distractor_hwc = list(to_hwc(gallery.images)), list(to_hwc(distractors))
        rng = np.random.default_rng([sizes.seed, 17])
        impostors = sizes.impostors_per_genuine * sizes.subjects * k
        for label, pixels in [("hr", size)] + [(f"px{r:02d}", r) for r in sizes.resolutions]:
            low = list(to_hwc(downsample(probes, pixels)))
            write_tinyface(tmp / label / "tinyface", low, probe_subjects.tolist(), gallery_hwc, subjects.tolist(),
                           distractor_hwc)
            if label == "hr":
                continue
            # HR gallery image (index < subjects) against an LR probe (index >= subjects).
            names = [f"{s}_hr.png" for s in subjects] + [f"{s}_{j}_lr.png" for s, j in zip(probe_subjects,
                                                                                          probe_samples)]
            gallery_rows, probe_rows = np.arange(sizes.subjects), sizes.subjects + np.arange(len(low))
            positive, negative = verification_pairs(gallery_rows, probe_rows, subjects, probe_subjects,
                                                    impostors, rng)
            write_survface_verification(tmp / label / "hr-lr", gallery_hwc + low, names, positive, negative)
            probe_rows = np.arange(len(low))
            positive, negative = verification_pairs(probe_rows, probe_rows, probe_subjects, probe_subjects,
                                                    impostors, rng)
            positive = [(a, b) for a, b in positive if a < b]
            write_survface_verification(tmp / label / "lr-lr", low, names[sizes.subjects:], positive, negative)
        return {"benchmark": "synth-lowres", "sizes": sizes.__dict__, "input_size": size,
                "offsets": {"subjects": LOWRES_OFFSET, "distractors": LOWRES_DISTRACTOR_OFFSET}}

    return _materialise(folder, build)


# ----------------------------------------------------------------------------------------------------
# synth-quality
# ----------------------------------------------------------------------------------------------------


def _jpeg_quality(strength: torch.Tensor) -> torch.Tensor:
    best, worst = JPEG_QUALITY_AT
    raw = best - (best - worst) * strength
    return (torch.round(raw / JPEG_QUALITY_STEP) * JPEG_QUALITY_STEP).long()


def degraded_render(synth: SynthFace, identities: torch.Tensor, samples: torch.Tensor, kinds: np.ndarray,
                    strengths: np.ndarray, signs: np.ndarray) -> torch.Tensor:
    """uint8 images of ``identities`` under a neutral condition plus ONE nuisance each (``kinds[i]`` of
    :data:`QUALITY_NUISANCES` at ``strengths[i]``; ``signs`` picks the yaw side)."""
    count, size = identities.shape[0], synth.config.image_size
    nuisance = Nuisance.neutral(count)
    t = torch.as_tensor(strengths, dtype=torch.float64)
    kind = {name: torch.as_tensor(kinds == name) for name in QUALITY_NUISANCES}
    zero = torch.zeros_like(t)
    nuisance = replace(
        nuisance,
        blur_sigma=torch.where(kind["blur"], MAX_BLUR_SIGMA_112 * t, zero),
        noise_std=torch.where(kind["noise"], MAX_NOISE_STD * t, zero),
        jpeg_quality=torch.where(kind["jpeg"], _jpeg_quality(t), torch.zeros_like(t, dtype=torch.long)),
        yaw=torch.where(kind["pose"], math.radians(MAX_YAW_DEG) * t * torch.as_tensor(signs, dtype=torch.float64),
                        zero),
        pixel_noise_key=samples.long() * 7919 + identities.long(),
    )
    images = synth.render_with(synth.identity_params(identities, EVAL_NAMESPACE), nuisance).images
    for i in np.flatnonzero(kinds == "resolution"):
        pixels = round(size - strengths[i] * (size - MIN_RESOLUTION_PX))
        images[i:i + 1] = upsample(downsample(images[i:i + 1], pixels), size)
    for i in np.flatnonzero(kinds == "occlusion"):
        rows = round(MAX_OCCLUDED_ROWS * strengths[i] * size)
        if rows:
            images[i, :, size - rows:, :] = OCCLUDER_GREY
    return images


def ensure_synth_quality(data: DataSettings, sizes: SynthQualitySizes = SYNTH_QUALITY, progress: bool = True) -> Path:
    """The synth-quality folder (generated on first use; module docstring)."""
    folder = benchmark_folder(data, "synth-quality", sizes, __name__)

    def build(tmp: Path) -> dict:
        synth = _synth(data)
        rng = np.random.default_rng([sizes.seed, 23])
        count = sizes.subjects * sizes.images_per_subject
        subjects = np.repeat(np.arange(QUALITY_OFFSET, QUALITY_OFFSET + sizes.subjects), sizes.images_per_subject)
        samples = np.tile(np.arange(sizes.images_per_subject), sizes.subjects)
        kinds = np.asarray(QUALITY_NUISANCES)[rng.integers(len(QUALITY_NUISANCES), size=count)]
        strengths = rng.random(count)
        signs = rng.choice([-1.0, 1.0], size=count)
        images = torch.cat([degraded_render(synth, torch.as_tensor(subjects[i:i + 1024]),
                                            torch.as_tensor(samples[i:i + 1024]), kinds[i:i + 1024],
                                            strengths[i:i + 1024], signs[i:i + 1024])
                            for i in range(0, count, 1024)])
        names = [f"{s}_{j}.png" for s, j in zip(subjects, samples)]
        rows = np.arange(count)
        positive, negative = verification_pairs(rows, rows, subjects, subjects, sizes.impostor_pairs, rng)
        positive = [(a, b) for a, b in positive if a < b]
        write_survface_verification(tmp / "verification", list(to_hwc(images)), names, positive, negative)
        with (tmp / "degradation.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "nuisance", "strength"])
            writer.writerows([name, kind, f"{t:.6f}"] for name, kind, t in zip(names, kinds, strengths))
        ui_ids = torch.arange(UI_OFFSET, UI_OFFSET + sizes.ui_images)
        ui = downsample(synth.render(ui_ids, torch.zeros_like(ui_ids), EVAL_NAMESPACE).images, UI_RESOLUTION_PX)
        (tmp / "ui").mkdir()
        for identity, image in zip(ui_ids.tolist(), ui):
            write_image(tmp / "ui" / f"{identity}.png", image)
        return {"benchmark": "synth-quality", "sizes": sizes.__dict__, "nuisances": list(QUALITY_NUISANCES),
                "genuine_pairs": len(positive), "impostor_pairs": len(negative)}

    return _materialise(folder, build)
