"""Training splits computed from a labels array alone (never from decoded images).

- ``full``: every image of the pool.
- ``shallow``: ``shallow_images`` (2) random images per identity, the "shallow face learning" setting of
  SST (Du et al., ECCV 2020, Sec. 1: "only two face images are available for each ID") and MASST.
  Identities with fewer images keep all they have.
- ``longtail``: per-identity image counts drawn from a seeded discrete power law
  ``P(n) ~ n^-a`` on ``[min_images, max available]``: most identities keep 1-2 images (the tail), a few
  keep many (the head), as in MegaFace2-style long-tailed data. The exponent, bounds and seed are recorded.

Every recipe is deterministic in (labels, settings), vectorised (a 5.8M-image index splits in seconds),
and cached as an index file keyed by the dataset fingerprint, the recipe and the seed. Randomness comes
from two NumPy streams: ``default_rng([seed, 0])`` picks the ``max_identities`` kept identities
(``choice`` of the present ids without replacement), ``default_rng([seed, 1])`` serves the recipe. The
long-tail recipe draws one count per identity id ``0 .. largest kept id`` in id order (``choice`` over the
support with probabilities ``n^-a / sum``; ids not kept draw too), caps it at the identity's images, then
keeps that many of its images chosen at random.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import SplitSettings
from bench.records import atomic_write_npy, atomic_write_text
from methods.registry import Registry

SplitRecipe = Callable[[np.ndarray, SplitSettings, np.random.Generator], np.ndarray]
SPLITS: Registry[SplitRecipe] = Registry("split")


@dataclass
class SplitIndex:
    """The pool indices of a split (sorted), with the recipe that made them and their statistics."""

    name: str
    indices: np.ndarray
    recipe: dict[str, Any]
    stats: dict[str, Any]


def _group(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images in (identity, random) order, the position of each image within its identity, and per-image counts.

    Returns ``order`` (pool indices), ``rank`` (0-based rank of ``order[i]`` within its identity under a
    random permutation) and ``count`` (number of pool images of the identity of ``order[i]``).
    """
    keys = rng.random(labels.shape[0])
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, sorted_labels.shape[0]])
    group_start = np.repeat(starts, sizes)
    return order, np.arange(order.shape[0]) - group_start, np.repeat(sizes, sizes)


def _keep_per_identity(labels: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``keep[c]`` random images of each identity ``c`` (all of them where it has fewer)."""
    order, rank, _ = _group(labels, rng)
    return np.sort(order[rank < keep[labels[order]]])


@SPLITS.register("full")
def full_split(labels: np.ndarray, settings: SplitSettings, rng: np.random.Generator) -> np.ndarray:
    """Every image."""
    return np.arange(labels.shape[0])


@SPLITS.register("shallow")
def shallow_split(labels: np.ndarray, settings: SplitSettings, rng: np.random.Generator) -> np.ndarray:
    """``settings.shallow_images`` random images per identity (SST / MASST shallow data)."""
    keep = np.full(int(labels.max()) + 1, settings.shallow_images)
    return _keep_per_identity(labels, keep, rng)


def power_law_counts(num_identities: int, exponent: float, min_images: int, max_images: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Draw per-identity image counts from ``P(n) ~ n^-exponent`` on the integers ``[min_images, max_images]``."""
    support = np.arange(min_images, max(min_images, max_images) + 1)
    weights = support.astype(np.float64) ** -exponent
    return rng.choice(support, size=num_identities, p=weights / weights.sum())


@SPLITS.register("longtail")
def longtail_split(labels: np.ndarray, settings: SplitSettings, rng: np.random.Generator) -> np.ndarray:
    """Per-identity counts from a power law, capped by what each identity has."""
    available = np.bincount(labels)
    counts = power_law_counts(available.shape[0], settings.longtail_exponent, settings.longtail_min_images,
                              int(available.max()), rng)
    return _keep_per_identity(labels, np.minimum(counts, available), rng)


def recipe_of(settings: SplitSettings) -> dict[str, Any]:
    """The parameters that determine a split (recorded in every run record)."""
    recipe: dict[str, Any] = {"name": settings.name, "seed": settings.seed, "max_identities": settings.max_identities}
    if settings.name == "shallow":
        recipe["images_per_identity"] = settings.shallow_images
    elif settings.name == "longtail":
        recipe.update(distribution="discrete power law P(n) ~ n^-a", exponent=settings.longtail_exponent,
                      min_images=settings.longtail_min_images)
    return recipe


def _restrict_identities(labels: np.ndarray, max_identities: int, rng: np.random.Generator) -> np.ndarray:
    """Pool indices of ``max_identities`` identities chosen at random (all when 0 or more than exist)."""
    present = np.flatnonzero(np.bincount(labels))  # np.unique(labels), O(n): numpy 2's hash unique takes ~2 s at 5.8M
    if max_identities == 0 or max_identities >= present.shape[0]:
        return np.arange(labels.shape[0])
    chosen = np.sort(rng.choice(present, size=max_identities, replace=False))
    return np.flatnonzero(np.isin(labels, chosen))


def make_split(labels: np.ndarray, settings: SplitSettings) -> SplitIndex:
    """Compute the split ``settings.name`` of a pool whose image ``i`` belongs to identity ``labels[i]``."""
    recipe = SPLITS.get(settings.name)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or labels.shape[0] == 0 or labels.min() < 0:
        raise ValueError("labels must be a non-empty 1-D array of non-negative identity ids")
    # One independent stream per purpose, so changing max_identities does not reshuffle the recipe's draws.
    restrict_rng, recipe_rng = (np.random.default_rng([settings.seed, purpose]) for purpose in (0, 1))
    candidates = _restrict_identities(labels, settings.max_identities, restrict_rng)
    selected = candidates[recipe(labels[candidates], settings, recipe_rng)]
    return SplitIndex(settings.name, np.sort(selected), recipe_of(settings), split_stats(labels[selected]))


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when all equal, towards 1 when one holds everything.

    G = sum_i sum_j |x_i - x_j| / (2 n^2 mean), computed from the sorted values as
    G = (2 sum_i i x_(i)) / (n sum x) - (n + 1) / n with i = 1..n.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.shape[0], x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def split_stats(selected_labels: np.ndarray) -> dict[str, Any]:
    """Identities, images, the images-per-identity histogram and its Gini coefficient."""
    counts = np.bincount(selected_labels)  # np.unique(..., return_counts=True) in O(n), for 5.8M-image splits
    per_identity = counts[counts > 0]
    sizes, num_ids = np.unique(per_identity, return_counts=True)
    return {
        "identities": int(per_identity.shape[0]),
        "images": int(selected_labels.shape[0]),
        "images_per_identity": {
            "min": int(per_identity.min()), "median": float(np.median(per_identity)),
            "mean": float(per_identity.mean()), "max": int(per_identity.max()),
            "histogram": {str(s): int(c) for s, c in zip(sizes, num_ids)},  # JSON keys are strings
        },
        "gini": gini(per_identity),
    }


def labels_fingerprint(labels: np.ndarray) -> str:
    """A hash of a labels array: two pools with the same labels give the same split files."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def load_or_make_split(labels: np.ndarray, settings: SplitSettings, cache_dir: Path) -> SplitIndex:
    """:func:`make_split`, cached as ``<cache_dir>/<labels-hash>/<recipe-hash>.npy`` (+ ``.json``)."""
    recipe = recipe_of(settings)
    recipe_key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(cache_dir) / labels_fingerprint(labels) / f"{settings.name}-{recipe_key}"
    index_file, meta_file = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if index_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return SplitIndex(settings.name, np.load(index_file), meta["recipe"], meta["stats"])
    split = make_split(labels, settings)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_npy(index_file, split.indices)
    atomic_write_text(meta_file, json.dumps({"recipe": split.recipe, "stats": split.stats}, indent=1))
    return split

