"""SynthFace benchmark folders in the real on-disk formats, from held-out identities.

Each generator renders identities of SynthFace's evaluation namespace (which no training split uses)
and writes a folder that the real readers evaluate unchanged, so ``bench run`` exercises the very code
that scores LFW, IJB-C and MegaFace. Identity ranges inside the namespace keep the three benchmarks
apart: synth-lfw ``[0, 2000)``, synth-ijbc subjects from 100,000, synth-megaface probes from 200,000
(their look-alike "noise" people from 300,000) and distractors from 1,000,000.

- ``synth-lfw``: ``synth-lfw.bin``, an insightface ``.bin`` pack (Python-2 protocol-2 pickle, PNG entries
  so the pixels are exactly the rendered ones) of 6,000 LFW View-2 pairs; images at the training size.
- ``synth-ijbc``: an ``IJBC`` folder: ``loose_crop/<k>.jpg`` of 144 x 144 px (the 112-px render placed by a
  random similarity: scale 0.8-1.1, rotation sd 8 degrees, shift up to 10 px, edges replicated, JPEG
  quality 90), ``meta/ijbc_face_tid_mid.txt``, ``meta/ijbc_name_5pts_score.txt`` (the true landmarks moved
  by that similarity plus detector noise of sd 1 px, and a detector score that falls with yaw, pitch,
  masks, sunglasses and blur), ``meta/ijbc_template_pair_label.txt`` (every pair of the 1:1 templates) and
  the 1:N CSVs (gallery G1 = first half of the subjects, G2 = second half, one gallery template each;
  probe_mixed = the 1:1 templates). A template has one media (two with probability 0.3); a media is a
  still (60 %) or a video of 2-3 frames that share its lighting, background and occlusion but move
  slightly (pose jitter, expression, noise), so media pooling matters.
- ``synth-megaface``: a devkit-style folder: ``facescrub_images/<person>/<person>_<k>.png``,
  ``megaface_images/<a>/<b>/<n>_0.jpg``, ``templatelists/facescrub_features_list.json`` and
  ``megaface_features_list.json_<size>_1`` (nested random subsets), and noise lists: some probe images
  are another person's face under the probe's name (FaceScrub's label noise) and some distractors are
  images of probe people (MegaFace's distractor noise); both are listed, with decoys that match no file,
  as in the real lists. Images at the training size (the real testpack holds aligned crops).

Default sizes (:data:`SYNTH_IJBC`, :data:`SYNTH_MEGAFACE`) keep evaluation a small part of a method's
training time on a 2-core CPU: synth-lfw 12,000 images; synth-ijbc 300 subjects, 1,500 templates (1,200 in
1:1: 719,400 pairs, 1,800 genuine, so FAR 1e-5 is about 7 impostors) and 3,111 images; synth-megaface 80
people x 5 images (1,600 ordered probe pairs) and 10 / 100 / 1,000 distractors (1,400 images): 16,511 images
per method, 1.38 times synth-lfw alone. ``tests/conftest.py`` shrinks them for tests.

Folders are cached under ``<data root>/synthface/<world key>/``, keyed by the sizes and by this module's
source, and are created atomically (built in a temporary folder, then renamed).

The generators write through :mod:`bench.eval.formats` and import no protocol; the ``synth-*`` protocols
(:mod:`bench.eval.verification`, :mod:`bench.eval.ijb`, :mod:`bench.eval.megaface`) call them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.config import DataSettings
from bench.data.synth_trainset import EVAL_NAMESPACE, synthface_world_key
from bench.data.synthface import Nuisance, SynthFace, SynthFaceConfig
from bench.errors import DataError
from bench.eval.align import ALIGNED_SIZE, warp_affine
from bench.eval.formats.bin import dumps_bin
from bench.eval.formats.images import encode_jpeg, encode_png, to_hwc
from bench.eval.formats.megaface_files import (DISTRACTOR_LIST_PREFIX, FACESCRUB_NOISES, MEGAFACE_NOISES, PROBE_LIST,
                                              write_json_list)

IJBC_SUBJECT_OFFSET = 100_000
MEGAFACE_PROBE_OFFSET = 200_000
MEGAFACE_IMPOSTER_OFFSET = 300_000
MEGAFACE_DISTRACTOR_OFFSET = 1_000_000
#: Side of the synth-ijbc loose crops (the faces are rendered at 112 and placed inside).
LOOSE_CROP_SIZE = 144
LOOSE_SCALE = (0.8, 1.1)
LOOSE_ROTATION_STD_RAD = math.radians(8.0)
LOOSE_SHIFT_PX = 10.0
LANDMARK_NOISE_PX = 1.0
LOOSE_JPEG_QUALITY = 90
DISTRACTOR_JPEG_QUALITY = 90
#: Video frames: pose jitter as a fraction of a fresh draw's pose (the rest comes from the media).
FRAME_POSE_JITTER = 0.25
RENDER_BATCH = 512


@dataclass(frozen=True)
class SynthIJBCSizes:
    subjects: int = 300
    #: 1:1 templates per subject (every pair of 1:1 templates is scored); each subject also gets one
    #: gallery template for 1:N.
    templates_per_subject: int = 4
    #: A template holds one media, or two with this probability.
    two_media_fraction: float = 0.3
    still_fraction: float = 0.6
    max_frames_per_video: int = 3
    seed: int = 0


@dataclass(frozen=True)
class SynthMegaFaceSizes:
    identities: int = 80
    images_per_identity: int = 5
    distractor_sizes: tuple[int, ...] = (10, 100, 1000)
    #: Share of probe images that show another person (FaceScrub noise) and of distractors that show a
    #: probe person (MegaFace noise).
    probe_noise: float = 0.03
    distractor_noise: float = 0.01
    seed: int = 0


SYNTH_IJBC = SynthIJBCSizes()
SYNTH_MEGAFACE = SynthMegaFaceSizes()


def source_hash(module_name: str = __name__) -> str:
    """A hash of a generator module's source: a generated folder's key, so a changed generator writes anew."""
    return hashlib.sha256(inspect.getsource(sys.modules[module_name]).encode()).hexdigest()[:12]


def generation_info(folder: Path) -> dict | None:
    """What a generated benchmark folder holds (its ``COMPLETE.json``), or None for real benchmarks."""
    marker = Path(folder) / "COMPLETE.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def benchmark_folder(data: DataSettings, kind: str, sizes: object, module_name: str = __name__) -> Path:
    """Where the generated benchmark ``kind`` of these ``sizes`` is cached, keyed by the generating module."""
    key = hashlib.sha256(json.dumps([kind, sizes, source_hash(module_name)], sort_keys=True, default=str).encode())
    return data.resolved_root() / "synthface" / synthface_world_key(data.synthface) / f"{kind}-{key.hexdigest()[:12]}"


def _materialise(folder: Path, build: Callable[[Path], dict]) -> Path:
    """``folder``, built by ``build(tmp)`` into a temporary sibling and renamed into place, unless complete."""
    marker = folder / "COMPLETE.json"
    if marker.is_file():
        return folder
    if folder.exists():
        raise DataError(f"{folder}: exists but is incomplete (no COMPLETE.json); delete it to regenerate")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        info = build(tmp)
        (tmp / "COMPLETE.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        os.rename(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if marker.is_file():  # another process finished the same folder first
            return folder
        raise DataError(f"{folder}: cannot write the synthetic benchmark ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _synth(data: DataSettings, image_size: int | None = None) -> SynthFace:
    s = data.synthface
    return _renderer(SynthFaceConfig(seed=s.seed, image_size=image_size or s.image_size, nuisance=s.nuisance,
                                     twin_fraction=s.twin_fraction))


@functools.lru_cache(maxsize=4)
def _renderer(config: SynthFaceConfig) -> SynthFace:
    """One renderer per world (building its sensor-noise tile takes a while)."""
    return SynthFace(config)


# ----------------------------------------------------------------------------------------------------
# synth-lfw
# ----------------------------------------------------------------------------------------------------


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


def ensure_synth_lfw(data: DataSettings, num_identities: int = 2000, pairs_per_kind: int = 300,
                     progress: bool = True) -> Path:
    """The synth-lfw ``.bin`` (generated on first use): 10 folds of ``pairs_per_kind`` genuine + impostor pairs."""
    sizes = {"num_identities": num_identities, "pairs_per_kind": pairs_per_kind}
    folder = benchmark_folder(data, "synth-lfw", sizes)

    def build(tmp: Path) -> dict:
        identities, samples, issame = lfw_style_pairs(num_identities, seed=data.synthface.seed,
                                                      pairs_per_kind=pairs_per_kind)
        rendered = _synth(data).render_many(torch.as_tensor(identities), torch.as_tensor(samples), EVAL_NAMESPACE,
                                            progress=progress, description="rendering synth-lfw pairs")
        tmp.mkdir(parents=True)
        entries = [encode_png(image) for image in to_hwc(rendered.images)]
        (tmp / "synth-lfw.bin").write_bytes(dumps_bin(entries, issame.tolist()))
        return {"benchmark": "synth-lfw", **sizes, "pairs": int(issame.shape[0]), "images": len(entries)}

    return _materialise(folder, build) / "synth-lfw.bin"


# ----------------------------------------------------------------------------------------------------
# synth-ijbc
# ----------------------------------------------------------------------------------------------------


@dataclass
class _IJBLayout:
    subject: np.ndarray        # per image
    template: np.ndarray
    media: np.ndarray
    media_sample: np.ndarray   # the sample id that sets the media's lighting, background, occlusion
    frame_sample: np.ndarray   # the sample id of the image itself
    template_subject: dict[int, int]
    one_to_one: list[int]      # 1:1 template ids
    gallery: dict[str, list[int]]


def _ijbc_layout(sizes: SynthIJBCSizes) -> _IJBLayout:
    rng = np.random.default_rng([sizes.seed, 61])
    rows: list[tuple[int, int, int, int, int]] = []
    template_subject, one_to_one, gallery = {}, [], {"G1": [], "G2": []}
    next_template, next_media, next_sample = 1, 1, 0
    half = (sizes.subjects + 1) // 2
    for subject in range(1, sizes.subjects + 1):
        for k in range(sizes.templates_per_subject + 1):
            template = next_template
            next_template += 1
            template_subject[template] = subject
            if k < sizes.templates_per_subject:
                one_to_one.append(template)
            else:
                gallery["G1" if subject <= half else "G2"].append(template)
            for _ in range(2 if rng.random() < sizes.two_media_fraction else 1):
                media, media_sample = next_media, next_sample
                next_media += 1
                still = rng.random() < sizes.still_fraction
                frames = 1 if still else int(rng.integers(2, sizes.max_frames_per_video + 1))
                for frame in range(frames):
                    rows.append((subject, template, media, media_sample, next_sample))
                    next_sample += 1
    table = np.asarray(rows, dtype=np.int64)
    return _IJBLayout(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], template_subject,
                      one_to_one, gallery)


def _frame_nuisance(synth: SynthFace, identities: torch.Tensor, media_samples: torch.Tensor,
                    frame_samples: torch.Tensor) -> Nuisance:
    """Video frames share the media's scene and move slightly; stills (frame == media sample) are unchanged."""
    base = synth.sample_nuisance(identities, media_samples, EVAL_NAMESPACE)
    own = synth.sample_nuisance(identities, frame_samples, EVAL_NAMESPACE)
    still = (frame_samples == media_samples).double()
    moving = 1.0 - still

    def jitter(name: str) -> torch.Tensor:
        return getattr(base, name) + moving * FRAME_POSE_JITTER * getattr(own, name)

    return replace(base, yaw=jitter("yaw"), pitch=jitter("pitch"), roll=jitter("roll"),
                   smile=still * base.smile + moving * own.smile,
                   mouth_open=still * base.mouth_open + moving * own.mouth_open,
                   blink=still * base.blink + moving * own.blink,
                   noise_std=still * base.noise_std + moving * own.noise_std,
                   misalign_shift=base.misalign_shift + moving[:, None] * own.misalign_shift,
                   pixel_noise_key=torch.where(still > 0, base.pixel_noise_key, own.pixel_noise_key))


def detector_scores(nuisance: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """A face-detector confidence in (0, 1) that falls with yaw, pitch, masks, sunglasses and blur."""
    yaw, pitch = nuisance.yaw.numpy(), nuisance.pitch.numpy()
    score = np.exp(-0.5 * ((yaw / 0.7) ** 2 + (pitch / 0.5) ** 2))
    score *= 1 - 0.3 * nuisance.mask.numpy()
    score *= 1 - 0.3 * nuisance.glasses.numpy() * nuisance.glasses_tint.numpy()
    score *= 1 - 0.15 * np.minimum(nuisance.blur_sigma.numpy() / 2.8, 1.0)
    return np.clip(score + rng.uniform(-0.02, 0.02, size=score.shape), 0.05, 0.999)


def _loose_similarities(count: int, rng: np.random.Generator) -> np.ndarray:
    """Random similarities from the 112 render into the loose crop (face centre near the crop centre)."""
    scale = rng.uniform(*LOOSE_SCALE, size=count)
    angle = rng.normal(0.0, LOOSE_ROTATION_STD_RAD, size=count)
    shift = rng.uniform(-LOOSE_SHIFT_PX, LOOSE_SHIFT_PX, size=(count, 2))
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    linear = np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1)
    centre_in, centre_out = (ALIGNED_SIZE - 1) / 2, (LOOSE_CROP_SIZE - 1) / 2
    translation = centre_out + shift - np.einsum("nij,j->ni", linear, np.array([centre_in, centre_in]))
    return np.concatenate([linear, translation[..., None]], 2)


def ensure_synth_ijbc(data: DataSettings, sizes: SynthIJBCSizes = SYNTH_IJBC, progress: bool = True) -> Path:
    """The synth-ijbc folder (generated on first use); returns the folder holding ``meta/`` and ``loose_crop/``."""
    folder = benchmark_folder(data, "synth-ijbc", asdict(sizes))

    def build(tmp: Path) -> dict:
        layout = _ijbc_layout(sizes)
        synth = _synth(data, ALIGNED_SIZE)
        rng = np.random.default_rng([sizes.seed, 62])
        count = layout.subject.shape[0]
        (tmp / "loose_crop").mkdir(parents=True)
        (tmp / "meta").mkdir()
        identities = torch.as_tensor(IJBC_SUBJECT_OFFSET + layout.subject)
        names = [f"{k + 1}.jpg" for k in range(count)]
        landmark_lines = []
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), disable=not progress, transient=False) as bar:
            task = bar.add_task("rendering synth-ijbc loose crops", total=count)
            for start in range(0, count, RENDER_BATCH):
                stop = min(start + RENDER_BATCH, count)
                ids = identities[start:stop]
                nuisance = _frame_nuisance(synth, ids, torch.as_tensor(layout.media_sample[start:stop]),
                                           torch.as_tensor(layout.frame_sample[start:stop]))
                rendered = synth.render_with(synth.identity_params(ids, EVAL_NAMESPACE), nuisance)
                similarity = _loose_similarities(stop - start, rng)
                loose = warp_affine(rendered.images, similarity, LOOSE_CROP_SIZE, padding="border")
                points = np.einsum("nij,nkj->nki", similarity[:, :, :2], rendered.landmarks.double().numpy())
                points += similarity[:, None, :, 2]
                points += rng.normal(0.0, LANDMARK_NOISE_PX, size=points.shape) * similarity[:, None, 0, :1]
                scores = detector_scores(nuisance, rng)
                loose_hwc = to_hwc(loose)
                for k in range(stop - start):
                    (tmp / "loose_crop" / names[start + k]).write_bytes(encode_jpeg(loose_hwc[k], LOOSE_JPEG_QUALITY))
                    coords = " ".join(f"{v:.3f}" for v in points[k].reshape(-1))
                    landmark_lines.append(f"{names[start + k]} {coords} {scores[k]:.3f}")
                bar.advance(task, stop - start)
        meta = tmp / "meta"
        (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(landmark_lines) + "\n")
        (meta / "ijbc_face_tid_mid.txt").write_text("".join(
            f"{names[k]} {layout.template[k]} {layout.media[k]}\n" for k in range(count)))
        templates = np.asarray(layout.one_to_one)
        first, second = np.triu_indices(templates.shape[0], k=1)
        subject_of = np.vectorize(layout.template_subject.get)
        same = subject_of(templates[first]) == subject_of(templates[second])
        pair_lines = np.char.add(np.char.add(np.char.add(np.char.add(templates[first].astype(str), " "),
                                                         templates[second].astype(str)), " "),
                                 same.astype(np.int64).astype(str))
        (meta / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines.tolist()) + "\n")
        header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
        for name, chosen in [("ijbc_1N_gallery_G1.csv", layout.gallery["G1"]),
                             ("ijbc_1N_gallery_G2.csv", layout.gallery["G2"]),
                             ("ijbc_1N_probe_mixed.csv", layout.one_to_one)]:
            rows = np.flatnonzero(np.isin(layout.template, chosen))
            (meta / name).write_text(header + "".join(
                f"{layout.template[k]},{layout.subject[k]},{names[k]},{layout.media[k]}\n" for k in rows))
        return {"benchmark": "synth-ijbc", **asdict(sizes), "images": count,
                "templates": len(layout.template_subject), "pairs": int(same.shape[0]),
                "genuine_pairs": int(same.sum()), "loose_crop_size": LOOSE_CROP_SIZE}

    return _materialise(folder, build)


# ----------------------------------------------------------------------------------------------------
# synth-megaface
# ----------------------------------------------------------------------------------------------------


def _distractor_path(n: int) -> str:
    return f"{n % 97}/{n // 37}@N00/{MEGAFACE_DISTRACTOR_OFFSET + n}_0.jpg"


def ensure_synth_megaface(data: DataSettings, sizes: SynthMegaFaceSizes = SYNTH_MEGAFACE,
                          progress: bool = True) -> Path:
    """The synth-megaface devkit-style folder (generated on first use)."""
    folder = benchmark_folder(data, "synth-megaface", asdict(sizes))

    def build(tmp: Path) -> dict:
        rng = np.random.default_rng([sizes.seed, 63])
        synth = _synth(data)
        people = [f"Synth_Person_{k:03d}" for k in range(sizes.identities)]
        probe_identity = np.repeat(np.arange(sizes.identities), sizes.images_per_identity)
        probe_sample = np.tile(np.arange(sizes.images_per_identity), sizes.identities)
        probe_paths = [f"{people[c]}/{people[c]}_{s}.png" for c, s in zip(probe_identity, probe_sample)]
        noisy_probe = rng.random(probe_identity.shape[0]) < sizes.probe_noise
        render_id = np.where(noisy_probe, MEGAFACE_IMPOSTER_OFFSET + np.arange(probe_identity.shape[0]),
                             MEGAFACE_PROBE_OFFSET + probe_identity)
        probes = synth.render_many(torch.as_tensor(render_id), torch.as_tensor(probe_sample), EVAL_NAMESPACE,
                                   progress=progress, description="rendering synth-megaface probes").images
        for path, image in zip(probe_paths, to_hwc(probes)):
            (tmp / "facescrub_images" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "facescrub_images" / path).write_bytes(encode_png(image))

        total = max(sizes.distractor_sizes)
        noisy_distractor = rng.random(total) < sizes.distractor_noise
        distractor_id = np.where(noisy_distractor,
                                 MEGAFACE_PROBE_OFFSET + rng.integers(0, sizes.identities, size=total),
                                 MEGAFACE_DISTRACTOR_OFFSET + np.arange(total))
        distractor_sample = np.where(noisy_distractor, 1000 + np.arange(total), 0)
        distractors = synth.render_many(torch.as_tensor(distractor_id), torch.as_tensor(distractor_sample),
                                        EVAL_NAMESPACE, progress=progress,
                                        description="rendering synth-megaface distractors").images
        paths = [_distractor_path(n) for n in range(total)]
        for path, image in zip(paths, to_hwc(distractors)):
            (tmp / "megaface_images" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "megaface_images" / path).write_bytes(encode_jpeg(image, DISTRACTOR_JPEG_QUALITY))

        lists = tmp / "templatelists"
        write_json_list(lists / PROBE_LIST, probe_paths, [people[c] for c in probe_identity])
        order = rng.permutation(total)
        for size in sizes.distractor_sizes:
            write_json_list(lists / f"{DISTRACTOR_LIST_PREFIX}{size}_1", [paths[n] for n in order[:size]])
        # Like the real lists: a comment line, names of files outside the probe list, a duplicate line.
        noisy_names = [Path(p).name for p, noisy in zip(probe_paths, noisy_probe) if noisy]
        decoys = [f"{people[0]}_{sizes.images_per_identity + k}.png" for k in range(3)]
        (tmp / FACESCRUB_NOISES).write_text("#Please strictly follow the rules of the benchmark\n"
                                            + "".join(f"{n}\n" for n in noisy_names + decoys))
        noisy_paths = [paths[n] for n in np.flatnonzero(noisy_distractor)]
        (tmp / MEGAFACE_NOISES).write_text("#Please strictly follow the rules of the benchmark\n"
                                           + "".join(f"{p}\n" for p in noisy_paths + noisy_paths[:1]))
        return {"benchmark": "synth-megaface", **asdict(sizes), "probes": len(probe_paths),
                "probe_noise": int(noisy_probe.sum()), "distractor_noise": int(noisy_distractor.sum())}

    return _materialise(folder, build)
