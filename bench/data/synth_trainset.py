"""The ``synthface`` training set (the default): the chosen split of the SynthFace pool, rendered once.

It renders the images of the chosen split of the synthetic pool once and caches them under the data root,
keyed by everything that determines the pixels (the world's settings and the renderer's source), so every
method of a run, and every later run, reads the same bytes; it is served from memory by
:class:`bench.data.datasets.TrainSet`. Registered in :data:`bench.data.datasets.DATASETS` as ``synthface``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import DataSettings, SynthFaceSettings
from bench.data.datasets import DATASETS, TrainSet
from bench.data.splits import load_or_make_split
from bench.data.synthface import Rendered, SynthFace, SynthFaceConfig
from bench.records import atomic_write_npy

#: SynthFace namespaces: training identities and held-out evaluation identities are different people.
TRAIN_NAMESPACE, EVAL_NAMESPACE = 0, 1


def synthface_config(settings: SynthFaceSettings) -> SynthFaceConfig:
    return SynthFaceConfig(seed=settings.seed, image_size=settings.image_size, nuisance=settings.nuisance,
                           twin_fraction=settings.twin_fraction)


def synthface_world_key(settings: SynthFaceSettings) -> str:
    """A hash of everything that determines SynthFace pixels: the world's settings and the renderer's code."""
    code_hash = hashlib.sha256(inspect.getsource(inspect.getmodule(SynthFace)).encode()).hexdigest()
    world = {"config": synthface_config(settings).__dict__, "renderer": code_hash}
    return hashlib.sha256(json.dumps(world, sort_keys=True, default=str).encode()).hexdigest()[:16]


def render_cached(synth: SynthFace, identities: np.ndarray, samples: np.ndarray, namespace: int,
                  cache_file: Path, progress: bool, description: str) -> Rendered:
    """Render (or load from ``cache_file``) the images of the given (identity, sample) pairs."""
    images_file, landmarks_file = cache_file.with_suffix(".images.npy"), cache_file.with_suffix(".landmarks.npy")
    if images_file.is_file() and landmarks_file.is_file():
        return Rendered(images=torch.from_numpy(np.load(images_file)),
                        landmarks=torch.from_numpy(np.load(landmarks_file)))
    rendered = synth.render_many(torch.as_tensor(identities, dtype=torch.long),
                                 torch.as_tensor(samples, dtype=torch.long), namespace,
                                 progress=progress, description=description)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npy(landmarks_file, rendered.landmarks.numpy())
    atomic_write_npy(images_file, rendered.images.numpy())
    return rendered


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace the labels of ``round(fraction * N)`` random images by a different random class.

    Returns the noisy labels and the boolean mask of flipped images. This is the "Flip" label noise of
    the Partial FC paper's WebFace12M-Flip experiments, applied to the training split only.
    """
    rng = np.random.default_rng([seed, 2])
    num_classes = int(labels.max()) + 1
    flipped = np.zeros(labels.shape[0], dtype=bool)
    flipped[rng.choice(labels.shape[0], size=int(round(fraction * labels.shape[0])), replace=False)] = True
    offsets = rng.integers(1, num_classes, size=int(flipped.sum()))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy, flipped


def lower_resolution(images: torch.Tensor, fraction: float, min_px: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A copy of uint8 ``images`` ``[N, 3, S, S]`` in which ``round(fraction * N)`` random images are brought
    down to a random side in ``[min_px, S)`` (antialiased bilinear) and back to ``S`` (bilinear): faces of
    very low resolution at the model's input size. Returns the images and each image's side (``S`` when
    untouched)."""
    count, size = images.shape[0], images.shape[-1]
    rng = np.random.default_rng([seed, 5])
    sides = np.full(count, size, dtype=np.int64)
    chosen = rng.choice(count, size=int(round(fraction * count)), replace=False)
    sides[chosen] = rng.integers(min_px, size, size=chosen.shape[0])
    out = images.clone()
    for side in np.unique(sides[chosen]):
        rows = torch.from_numpy(np.flatnonzero(sides == side))
        small = F.interpolate(out[rows].float(), size=(int(side), int(side)), mode="bilinear", align_corners=False,
                              antialias=True).round_().clamp_(0, 255)
        back = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
        out[rows] = back.round_().clamp_(0, 255).to(torch.uint8)
    return out, sides


@DATASETS.register("synthface")
def synthface_trainset(settings: DataSettings, progress: bool = True) -> TrainSet:
    """The chosen split of the SynthFace pool (``num_identities`` x ``images_per_identity``)."""
    synth_settings = settings.synthface
    root = settings.resolved_root()
    pool_identities = np.repeat(np.arange(synth_settings.num_identities), synth_settings.images_per_identity)
    pool_samples = np.tile(np.arange(synth_settings.images_per_identity), synth_settings.num_identities)
    split = load_or_make_split(pool_identities, settings.split, root / "splits" / "synthface")
    identities, samples = pool_identities[split.indices], pool_samples[split.indices]
    split_key = hashlib.sha256(split.indices.tobytes()).hexdigest()[:12]
    world_key = synthface_world_key(synth_settings)
    rendered = render_cached(SynthFace(synthface_config(synth_settings)), identities, samples, TRAIN_NAMESPACE,
                             root / "synthface" / world_key / f"train-{split_key}", progress,
                             f"rendering SynthFace {settings.split.name} ({len(identities)} images)")
    _, clean_labels = np.unique(identities, return_inverse=True)
    labels, flipped = (flip_labels(clean_labels, synth_settings.label_noise, settings.split.seed)
                       if synth_settings.label_noise > 0 else (clean_labels, np.zeros(len(clean_labels), bool)))
    images = rendered.images
    if synth_settings.lowres_fraction > 0:
        images, sides = lower_resolution(images, synth_settings.lowres_fraction, synth_settings.lowres_min_px,
                                         settings.split.seed)
    info = {"dataset": "synthface", "world": {**synthface_config(synth_settings).__dict__, "key": world_key,
                                              "pool_identities": synth_settings.num_identities,
                                              "pool_images_per_identity": synth_settings.images_per_identity},
            "split": {"recipe": split.recipe, **split.stats},
            "label_noise": {"fraction": synth_settings.label_noise, "flipped_images": int(flipped.sum())}}
    if synth_settings.lowres_fraction > 0:
        info["low_resolution"] = {"fraction": synth_settings.lowres_fraction, "min_px": synth_settings.lowres_min_px,
                                  "images": int((sides < images.shape[-1]).sum())}
    return TrainSet(images=images, labels=torch.from_numpy(labels.astype(np.int64)),
                    identities=identities, num_classes=int(clean_labels.max()) + 1, info=info,
                    label_flipped=flipped)
