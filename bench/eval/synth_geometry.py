"""``synth-geometry``: diagnostics of the embedding's geometry (alignment, class-centre divergence,
concentration of augmented data, uniformity) on held-out SynthFace identities, for every method of a run.

Why. Huang, Yi, Zhao, Jiang, "Towards the Generalization of Contrastive Self-Supervised Learning" (ICLR 2023,
arXiv:2111.00743) bound the downstream classification error by three factors: the *alignment* of positive
samples, the *divergence* of class centres and the *concentration* of augmented data, the last measured by
their (sigma, delta)-measure of the augmentation. Wang & Isola, "Understanding Contrastive Representation
Learning through Alignment and Uniformity on the Hypersphere" (ICML 2020, arXiv:2005.10242) measure
alignment and uniformity of L2-normalised features. This protocol reports these quantities, so a results
table can set a method's accuracy beside the geometry of its embedding.

Data. ``identities`` x ``images_per_identity`` images (:class:`SynthGeometrySizes`, default 100 x 8) of
SynthFace's evaluation namespace, identities from :data:`GEOMETRY_OFFSET` (600,000; no other benchmark uses
that range: synth-lfw [0, 2000), synth-ijbc from 100,000, synth-megaface 200,000 / 300,000 / from 1,000,000,
synth-lowres and synth-quality 400,000 to 550,000), sample ids ``0 .. images_per_identity - 1``, rendered
under the world's nuisance (pose, light, expression, occlusion... differ between an identity's images).
The images are rendered in memory when the protocol is built and never written to disk (ours: a diagnostic
has no real benchmark whose on-disk format it would exercise; 800 images of 32 px render in about two
seconds on one CPU thread), then resized to the model's input size (antialiased bilinear) as every protocol does.

Embeddings. ``f(x)``: the encoder's output, L2-normalised, **no flip** (every quantity below is defined on
the unit hypersphere; the flip-add of the verification protocols would itself be an augmentation).
Views: ``a(x) = methods.augment.augment(x, s)`` (SimCLR's pipeline, one knob) with ``s =
eval.geometry_strength``, by default :data:`GEOMETRY_STRENGTH` = 0.5 (ours), the same for every method of a
run; the concentration experiment sets it to each self-supervised run's own training strength, so that it
measures the augmentation that run learned from; ``methods/augment.py`` notes that Huang et al.'s code uses SimCLR's colour strength 0.5), ``draws``
(K, default 4) views per image, on the normalised images in chunks of :data:`AUGMENT_CHUNK` images, each
chunk and draw from its own generator seeded from (``seed``, chunk, draw): the same views for every method,
batch size and device.

Metrics (``n`` images, identity ``y_i``; every distance Euclidean between unit vectors):

- ``alignment_views``: mean over images of ``||f(a1(x)) - f(a2(x))||^2`` (two independent views, the first
  two draws): Wang & Isola's alignment with alpha = 2 over the positive pairs of self-supervised learning.
- ``alignment_identity``: mean of ``||f(x_i) - f(x_j)||^2`` over the pairs ``i < j`` of different images of
  one identity: the same alignment over the positive pairs of face recognition (other nuisance, same person).
- ``uniformity``: ``log mean exp(-2 ||f(x_i) - f(x_j)||^2)`` over all pairs ``i < j`` of distinct images
  (t = 2): Wang & Isola's uniformity (in [-8, 0] on the unit sphere; lower is more uniform).
- ``divergence``: the identity centres ``mu_k`` = normalised mean of the identity's unit embeddings;
  ``centre_cosine_mean`` / ``centre_cosine_max`` over pairs ``k < l`` of ``mu_k . mu_l``, and
  ``min_centre_distance`` = min over ``k < l`` of ``||mu_k - mu_l||`` (ours: normalised centres, so that
  the numbers compare across methods whatever the spread inside a class). Also ``centre_inner_max`` =
  max over ``k < l`` of ``m_k . m_l`` with ``m_k`` the *unnormalised* mean of the unit embeddings of all K
  views of the identity's images: the paper's centre is the mean over a class and its augmentations of
  the features (norm r = 1 here), and its divergence condition bounds these inner products from above
  (as we recall the theorem; see "What is confirmed" below).
- ``concentration``: the (sigma, delta)-measure, estimated on each identity's images as the class. For
  two images the *augmented distance* is the closest their augmented views come,
  ``d_A(x1, x2) = min over views v1 of x1, v2 of x2 of ||f(v1) - f(v2)||``, estimated over the K drawn
  views of each image (a min over K x K pairs: an upper estimate of the min over the whole augmentation
  family, falling as K grows); ``d_A(x, x) = 0`` (a view paired with itself). An augmentation is a
  (sigma, delta)-augmentation when every class ``C_k`` has a "main part" ``C_k^0``, a subset holding at
  least a share sigma of the class, whose members are pairwise within augmented distance delta. On an
  identity's n images this is computed exactly by enumerating every subset (2^n; n <= 16):

  * ``sigma_at_delta[d]``: per identity, the largest share of its images that are pairwise within
    ``d_A <= d`` (its main part at delta = d), averaged over identities; ``sigma_at_delta_worst[d]``: the
    smallest over identities (the definition's "every class");
  * ``delta_at_sigma[s]``: per identity, the smallest diameter (largest pairwise ``d_A``) of a subset
    holding at least ``ceil(s n)`` of its images, averaged over identities; ``delta_at_sigma_worst[s]``: the
    largest over identities. With n = 8, s = 0.9 needs all 8 images (the share is quantised in 1/n);
  * ``pairs``: the simpler pair statistic (ours): over all same-identity pairs ``i < j`` pooled,
    ``within_delta[d]`` = the share with ``d_A <= d`` and ``quantile[s]`` = the s-quantile of ``d_A`` (the
    smallest value below or at which a share s of the pairs lies).

  Grids (ours): delta in :data:`DELTA_GRID` (0.5, 0.8, 1.0; on the unit sphere 1.0 is a 60 degree
  angle), sigma in :data:`SIGMA_GRID` (0.5, 0.75, 0.9).

``summary`` (the results-table columns ``synth-geometry <key>``, shown by the report's "Representation
geometry" section, :mod:`bench.report.geometry_report`): ``align views``, ``align identity``,
``centre cos mean``, ``centre cos max``, ``concentration sigma@0.8`` (``sigma_at_delta["0.8"]``),
``concentration delta@0.9`` (``delta_at_sigma["0.9"]``) and ``uniformity``.

What is confirmed, what is an estimate, what is ours.

- Confirmed from the retrieved text of Huang et al. (arXiv abstract, ar5iv): the (sigma, delta)-measure
  quantifies the data augmentation and enters an upper bound of the downstream classification error; the
  three factors are the alignment of positive samples, the divergence of class centres and the
  concentration of augmented data; the first two are properties of the representation, the third is set
  by the augmentation, and downstream performance correlates strongly with it.
- Not confirmed from retrieved text (the stored copies hold the abstract only): the exact forms above of
  the augmented distance (min over the two images' augmentations), of the main part (share >= sigma of
  the class, pairwise ``d_A <= delta``) and of the centre inner-product condition. They follow the task's
  statement and our reading of the paper. In the paper, as we recall it, ``d_A`` is measured between the
  augmented *inputs* and reaches the features through the encoder's Lipschitz constant L (the bound holds
  L delta); ours measures it between the augmented views' *unit embeddings* (ours: a per-method number;
  for an L-Lipschitz f ours is at most L times the input-space value). The delta and sigma grids,
  the pooled-pair statistic, the normalised centres of ``centre_cosine_*`` / ``min_centre_distance``, and
  using SynthFace identities as the classes are ours; the min over K drawn views is an estimate.
- Wang & Isola (confirmed from their code's README, github.com/SsnL/align_uniform: ``align_loss(x, y,
  alpha=2)`` = mean ``||x - y||^alpha``, ``uniform_loss(x, t=2)`` = log of the mean of ``exp(-t d^2)`` over
  the distinct pairs): ``alignment_*`` and ``uniformity`` as defined there, alpha = 2, t = 2.

Cost: per method ``n`` clean embeddings plus ``n K`` views (800 + 3,200 by default; synth-lfw embeds 24,000
with its flip test), and ``identities x 2^n`` subsets (25,600 by default). ``score_features`` is not
supported: the views are images this protocol makes, so features computed elsewhere cannot supply them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.data.loader import normalise
from bench.data.synth_trainset import EVAL_NAMESPACE
from bench.errors import ConfigError, DataError
from bench.eval import PROTOCOLS, eval_input_size
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.images import resize_images
from bench.eval.synth_benchmarks import _synth

#: First SynthFace identity (evaluation namespace) of synth-geometry; no other benchmark uses [600,000, 1,000,000).
GEOMETRY_OFFSET = 600_000
#: Default augmentation strength of the views (ours; ``eval.geometry_strength`` overrides).
GEOMETRY_STRENGTH = 0.5
#: Wang & Isola's exponents: alignment alpha = 2, uniformity t = 2.
ALIGNMENT_ALPHA = 2.0
UNIFORMITY_T = 2.0
#: Augmented-distance thresholds of sigma(delta) and shares of delta(sigma) (ours).
DELTA_GRID = (0.5, 0.8, 1.0)
SIGMA_GRID = (0.5, 0.75, 0.9)
#: The grid points shown in the summary.
SUMMARY_DELTA, SUMMARY_SIGMA = 0.8, 0.9
#: Images augmented together under one generator (so views do not depend on the batch size).
AUGMENT_CHUNK = 64
#: Main parts are found by enumerating all 2^n subsets of an identity's images.
MAX_IMAGES_PER_IDENTITY = 16


@dataclass(frozen=True)
class SynthGeometrySizes:
    identities: int = 100
    images_per_identity: int = 8
    #: Augmented views per image (K): the min of the augmented distance runs over K x K view pairs.
    draws: int = 4
    seed: int = 0


SYNTH_GEOMETRY = SynthGeometrySizes()


def check_sizes(sizes: SynthGeometrySizes) -> None:
    """One-line ConfigError for sizes the metrics cannot use."""
    if sizes.identities < 2:
        raise ConfigError(f"synth-geometry: identities must be >= 2 (centre pairs), got {sizes.identities}")
    if not 2 <= sizes.images_per_identity <= MAX_IMAGES_PER_IDENTITY:
        raise ConfigError(f"synth-geometry: images_per_identity must be in [2, {MAX_IMAGES_PER_IDENTITY}] "
                          f"(pairs of one identity; main parts enumerate 2^n subsets), got {sizes.images_per_identity}")
    if sizes.draws < 2:
        raise ConfigError(f"synth-geometry: draws must be >= 2 (two views per image), got {sizes.draws}")


def grid_key(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------------------------------
# Metrics (numpy, float64; unit rows in)
# ----------------------------------------------------------------------------------------------------


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``||a_i - b_j||^2`` for every row pair, clipped at 0 (rounding)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(squared, 0.0)


def alignment(first: np.ndarray, second: np.ndarray, alpha: float = ALIGNMENT_ALPHA) -> float:
    """Wang & Isola's alignment: mean over rows of ``||first_i - second_i||^alpha``."""
    difference = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    return float(np.mean(np.linalg.norm(difference, axis=1) ** alpha))


def identity_alignment(features: np.ndarray, identities: np.ndarray, alpha: float = ALIGNMENT_ALPHA) -> float:
    """Mean ``||f_i - f_j||^alpha`` over pairs ``i < j`` of rows with the same identity."""
    features, identities = np.asarray(features, dtype=np.float64), np.asarray(identities)
    values = []
    for identity in np.unique(identities):
        members = features[identities == identity]
        first, second = np.triu_indices(members.shape[0], k=1)
        values.append(np.sqrt(_squared_distances(members, members)[first, second]) ** alpha)
    pooled = np.concatenate(values)
    if pooled.size == 0:
        raise ValueError("identity alignment needs an identity with two rows or more")
    return float(pooled.mean())


def uniformity(features: np.ndarray, t: float = UNIFORMITY_T) -> float:
    """Wang & Isola's uniformity: ``log mean exp(-t ||f_i - f_j||^2)`` over pairs ``i < j`` (log-sum-exp)."""
    features = np.asarray(features, dtype=np.float64)
    first, second = np.triu_indices(features.shape[0], k=1)
    if first.size == 0:
        raise ValueError("uniformity needs two rows or more")
    exponent = -t * _squared_distances(features, features)[first, second]
    top = exponent.max()
    return float(top + np.log(np.mean(np.exp(exponent - top))))


def identity_means(features: np.ndarray, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted identities and the (unnormalised) mean row of each; ``features`` may be ``[N, D]`` or
    ``[N, K, D]`` (views: the mean runs over images and views)."""
    features, identities = np.asarray(features, dtype=np.float64), np.asarray(identities)
    rows = features.reshape(features.shape[0], -1, features.shape[-1]).mean(axis=1)
    labels, index = np.unique(identities, return_inverse=True)
    sums = np.zeros((labels.shape[0], rows.shape[1]))
    np.add.at(sums, index, rows)
    return labels, sums / np.bincount(index)[:, None]


def centre_divergence(features: np.ndarray, identities: np.ndarray,
                      view_features: np.ndarray | None = None) -> dict[str, float]:
    """Pairwise statistics of the identity centres (module docstring): ``centre_cosine_mean``,
    ``centre_cosine_max``, ``min_centre_distance`` of the normalised means of ``features``, and with
    ``view_features`` ``[N, K, D]`` also ``centre_inner_max`` of their unnormalised means."""
    _, means = identity_means(features, identities)
    if means.shape[0] < 2:
        raise ValueError("centre divergence needs two identities or more")
    centres = l2_normalise(means)
    first, second = np.triu_indices(centres.shape[0], k=1)
    cosines = (centres @ centres.T)[first, second]
    distances = np.sqrt(_squared_distances(centres, centres)[first, second])
    out = {"centre_cosine_mean": float(cosines.mean()), "centre_cosine_max": float(cosines.max()),
           "min_centre_distance": float(distances.min())}
    if view_features is not None:
        _, view_means = identity_means(view_features, identities)
        out["centre_inner_max"] = float((view_means @ view_means.T)[first, second].max())
    return out


def augmented_distances(views: np.ndarray) -> np.ndarray:
    """``[n, n]`` augmented distances of n images from their unit view embeddings ``[n, K, D]``: the min over
    the K x K view pairs of the two images' distance; 0 on the diagonal (a view paired with itself)."""
    views = np.asarray(views, dtype=np.float64)
    count, draws, dim = views.shape
    flat = views.reshape(count * draws, dim)
    distances = np.sqrt(_squared_distances(flat, flat)).reshape(count, draws, count, draws)
    out = distances.min(axis=(1, 3))
    np.fill_diagonal(out, 0.0)
    return out


def subset_diameters(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size and diameter (largest pairwise distance; 0 for one member) of every non-empty subset of the n
    points of a symmetric ``[n, n]`` distance matrix: two arrays over the ``2^n - 1`` subsets."""
    count = distances.shape[0]
    if count > MAX_IMAGES_PER_IDENTITY:
        raise ValueError(f"subsets of more than {MAX_IMAGES_PER_IDENTITY} points are not enumerated")
    masks = np.arange(1, 1 << count)
    members = ((masks[:, None] >> np.arange(count)[None, :]) & 1).astype(bool)
    diameters = np.zeros(masks.shape[0])
    for i in range(count):
        for j in range(i + 1, count):
            both = members[:, i] & members[:, j]
            diameters = np.where(both, np.maximum(diameters, distances[i, j]), diameters)
    return members.sum(axis=1), diameters


def _needed(share: float, count: int) -> int:
    """The fewest members of a subset holding at least ``share`` of ``count`` points."""
    return max(1, math.ceil(share * count - 1e-9))


def main_part_share(distances: np.ndarray, delta: float) -> float:
    """The largest share of the points whose pairwise distances are all ``<= delta`` (a main part at delta)."""
    sizes, diameters = subset_diameters(distances)
    return float(sizes[diameters <= delta].max() / distances.shape[0])


def main_part_diameter(distances: np.ndarray, share: float) -> float:
    """The smallest diameter of a subset holding at least ``share`` of the points (``ceil(share n)`` of them)."""
    sizes, diameters = subset_diameters(distances)
    return float(diameters[sizes >= _needed(share, distances.shape[0])].min())


def concentration(distance_matrices: list[np.ndarray], delta_grid: tuple[float, ...] = DELTA_GRID,
                  sigma_grid: tuple[float, ...] = SIGMA_GRID) -> dict[str, Any]:
    """The (sigma, delta) estimates (module docstring) from each class's ``[n, n]`` augmented distances."""
    sigmas = np.array([[main_part_share(d, delta) for delta in delta_grid] for d in distance_matrices])
    deltas = np.array([[main_part_diameter(d, share) for share in sigma_grid] for d in distance_matrices])
    pairs = np.concatenate([d[np.triu_indices(d.shape[0], k=1)] for d in distance_matrices])
    if pairs.size == 0:
        raise ValueError("concentration needs a class with two members or more")
    return {
        "sigma_at_delta": {grid_key(x): float(sigmas[:, i].mean()) for i, x in enumerate(delta_grid)},
        "sigma_at_delta_worst": {grid_key(x): float(sigmas[:, i].min()) for i, x in enumerate(delta_grid)},
        "delta_at_sigma": {grid_key(s): float(deltas[:, i].mean()) for i, s in enumerate(sigma_grid)},
        "delta_at_sigma_worst": {grid_key(s): float(deltas[:, i].max()) for i, s in enumerate(sigma_grid)},
        "pairs": {"within_delta": {grid_key(x): float(np.mean(pairs <= x)) for x in delta_grid},
                  "quantile": {grid_key(s): float(np.quantile(pairs, s, method="inverted_cdf"))
                               for s in sigma_grid},
                  "count": int(pairs.size)},
        "delta_grid": list(delta_grid), "sigma_grid": list(sigma_grid),
    }


def geometry_metrics(clean: np.ndarray, views: np.ndarray, identities: np.ndarray) -> dict[str, Any]:
    """Every metric of the module docstring from the clean embeddings ``[N, D]``, the view embeddings
    ``[N, K, D]`` (K >= 2) and the identity of each image; rows are normalised here."""
    clean = l2_normalise(np.asarray(clean, dtype=np.float64))
    views = np.asarray(views, dtype=np.float64)
    views = l2_normalise(views.reshape(-1, views.shape[-1])).reshape(views.shape)
    identities = np.asarray(identities)
    labels = np.unique(identities)
    divergence = centre_divergence(clean, identities, views)
    concentrated = concentration([augmented_distances(views[identities == label]) for label in labels])
    out = {
        "alignment_views": alignment(views[:, 0], views[:, 1]),
        "alignment_identity": identity_alignment(clean, identities),
        "divergence": divergence,
        "concentration": concentrated,
        "uniformity": uniformity(clean),
    }
    out["summary"] = {
        "align views": out["alignment_views"], "align identity": out["alignment_identity"],
        "centre cos mean": divergence["centre_cosine_mean"], "centre cos max": divergence["centre_cosine_max"],
        f"concentration sigma@{grid_key(SUMMARY_DELTA)}": concentrated["sigma_at_delta"][grid_key(SUMMARY_DELTA)],
        f"concentration delta@{grid_key(SUMMARY_SIGMA)}": concentrated["delta_at_sigma"][grid_key(SUMMARY_SIGMA)],
        "uniformity": out["uniformity"],
    }
    return out


# ----------------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------------


def view_seed(seed: int, chunk: int, draw: int) -> int:
    """The generator seed of draw ``draw`` of image chunk ``chunk``."""
    return int(np.random.SeedSequence([seed, 29, chunk, draw]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def _embed(encoder: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int) -> np.ndarray:
    """float32 encoder outputs of normalised float images (the encoder already in eval mode)."""
    return torch.cat([encoder(images[start:start + batch_size].to(device)).float().cpu()
                      for start in range(0, images.shape[0], batch_size)]).numpy()


def view_features(encoder: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int, draws: int,
                  seed: int, augmenter: Callable[..., torch.Tensor], strength: float = GEOMETRY_STRENGTH) -> np.ndarray:
    """Encoder outputs ``[N, draws, D]`` of ``draws`` augmented views of each uint8 image (module docstring)."""
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = []
        for chunk, start in enumerate(range(0, images.shape[0], AUGMENT_CHUNK)):
            batch = normalise(images[start:start + AUGMENT_CHUNK])
            per_draw = []
            for draw in range(draws):
                generator = torch.Generator().manual_seed(view_seed(seed, chunk, draw))
                view = augmenter(batch, strength, generator=generator)
                if view.shape != batch.shape:
                    raise ValueError(f"the augmentation changed the images' shape: {tuple(batch.shape)} -> "
                                     f"{tuple(view.shape)}")
                per_draw.append(_embed(encoder, view, device, batch_size))
            chunks.append(np.stack(per_draw, axis=1))
        return np.concatenate(chunks)
    finally:
        encoder.train(was_training)


@PROTOCOLS.register("synth-geometry")
class SynthGeometry:
    """Alignment, centre divergence, (sigma, delta) concentration and uniformity of held-out SynthFace
    identities (module docstring)."""

    name: ClassVar[str] = "synth-geometry"
    headline: ClassVar[str] = "alignment_identity"

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 input_size: int | None = None, sizes: SynthGeometrySizes | None = None) -> None:
        if data.dataset != "synthface":
            raise DataError(f"synth-geometry: SynthFace only (dataset '{data.dataset}'): it renders held-out "
                            f"identities under controlled nuisance")
        self.options = options or EvalSettings()
        self.sizes = sizes or SYNTH_GEOMETRY  # read at call time: tests shrink it
        check_sizes(self.sizes)
        count, per = self.sizes.identities, self.sizes.images_per_identity
        render_ids = GEOMETRY_OFFSET + np.repeat(np.arange(count), per)
        samples = np.tile(np.arange(per), count)
        rendered = _synth(data).render_many(torch.as_tensor(render_ids), torch.as_tensor(samples), EVAL_NAMESPACE,
                                            progress=progress, description="rendering synth-geometry")
        self.identities = render_ids
        self.source_size = int(rendered.images.shape[-1])
        self.input_size = eval_input_size(data, input_size)
        self.images = resize_images(rendered.images, self.input_size)

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int,
                 augmenter: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
        """The metrics of ``encoder``; ``augmenter`` (tests) replaces :func:`methods.augment.augment`."""
        if augmenter is None:
            from methods.augment import augment as augmenter
        clean = extract_features(encoder, self.images, device, batch_size=batch_size, flip=False)
        views = view_features(encoder, self.images, device, batch_size, self.sizes.draws, self.sizes.seed,
                              augmenter, self.options.geometry_strength)
        out = geometry_metrics(clean, views, self.identities)
        out["counts"] = {"identities": self.sizes.identities, "images_per_identity": self.sizes.images_per_identity,
                         "images": int(self.images.shape[0]), "views": int(views.shape[0] * views.shape[1])}
        out["conventions"] = self._conventions()
        return out

    def score_features(self, features: Any, flip: bool | str = True) -> dict[str, Any]:
        raise DataError("synth-geometry: scoring precomputed features is not supported (it embeds augmented "
                        "views of its images); evaluate a checkpoint instead")

    def _conventions(self) -> dict[str, Any]:
        return {
            "embedding": "normalise(f(x)), no flip",
            "views": f"methods.augment.augment(x, strength={self.options.geometry_strength}) on the normalised images, "
                     f"{self.sizes.draws} per image, in chunks of {AUGMENT_CHUNK} images, each chunk and draw "
                     f"from a generator seeded from (seed {self.sizes.seed}, chunk, draw): the same for every method",
            "alignment": f"Wang & Isola: mean squared distance (alpha = {ALIGNMENT_ALPHA:g}); views: draws 1 and 2 "
                         f"of each image; identity: pairs of different images of one identity",
            "uniformity": f"Wang & Isola: log mean exp(-{UNIFORMITY_T:g} d^2) over all pairs of distinct images",
            "divergence": "centres: normalised mean of an identity's unit embeddings (cosine, min distance); "
                          "centre_inner_max: unnormalised mean over its images' views (the paper's centre, r = 1)",
            "concentration": "d_A(x1, x2) = min over the drawn views' embedding distances; main part of an identity "
                             "found by enumerating its image subsets; sigma_at_delta / delta_at_sigma: mean over "
                             "identities, *_worst: the worst identity; pairs: pooled same-identity pairs (ours)",
            "images": f"{self.sizes.identities} identities x {self.sizes.images_per_identity} images, SynthFace "
                      f"evaluation namespace from identity {GEOMETRY_OFFSET}, rendered in memory at "
                      f"{self.source_size}x{self.source_size}" + (
                          f", resized to {self.input_size}x{self.input_size} with antialiasing"
                          if self.source_size != self.input_size else ""),
            "sizes": asdict(self.sizes),
        }
