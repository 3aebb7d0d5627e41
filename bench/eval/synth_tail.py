"""``synth-tail``: the long-tail diagnostic. Does a method help the identities it saw few images of?

Closed-set rank-1 identification of *held-out* images of *training* identities against the identities'
mean embeddings, reported per bucket of how many images each identity had in the training split:

- gallery: for each evaluated identity, the mean of the unit embeddings of all its training-split images,
  L2-normalised (the "class center" a deployed system would enrol from the training data);
- probes: ``probes_per_identity`` newly rendered images of the same identity, with SynthFace sample ids
  from :data:`HELD_OUT_SAMPLE_OFFSET` on, which no split contains (the pool's samples are
  ``0 .. images_per_identity - 1``), so no probe was ever trained on;
- a probe is correct when its own identity's mean has the largest cosine among the gallery's means
  (ties count against it); embeddings follow ``eval.flip`` (``normalise(f(x) + f(flip x))`` by default);
- buckets by training images per identity: ``tail`` ``[1, 3)``, ``middle`` ``[3, 10)``, ``head``
  ``[10, inf)`` (:data:`BUCKET_EDGES`, recorded in the metrics). Fixed edges rather than quantiles, so a
  bucket means the same in every split: on the default ``longtail`` split (power law 1.5 on [1, 20],
  1,000 identities, 3,517 images) 61 % of identities are tail, 30 % middle and 9 % head; ``full`` has only head identities and ``shallow``
  only tail ones (the other buckets are reported empty).

Cost: at most :data:`IDENTITIES_PER_BUCKET` identities per bucket are evaluated (chosen with a fixed
seed, the same for every method of a run), so one evaluation embeds a few thousand images (a few seconds
on a 2-core CPU for the ``small`` backbone). The gallery holds every evaluated identity of every bucket,
so rank-1 is comparable across buckets and methods of one run but depends on the gallery size
(``num_gallery`` in the metrics). Label noise does not change the gallery: identities are the true ones.

Real training data: not supported yet, and a run that asks for it fails with one line. It would need
held-out images of training identities, e.g. a list file ``<image path> <class id>`` of images withheld
from the training split (a dataset card's ``held_out`` entry), read by the same decoders as the training
set; the gallery would be computed from the training split as here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, eval_input_size, features_file
from bench.eval.features import extract_features, l2_normalise
from bench.eval.formats.images import resize_images

#: Sample ids of held-out probe images (the training pool uses 0 .. images_per_identity - 1).
HELD_OUT_SAMPLE_OFFSET = 1_000_000
#: Lower edges of the middle and head buckets (training images per identity): tail [1, 3), middle
#: [3, 10), head [10, inf).
BUCKET_EDGES = (3, 10)
BUCKET_NAMES = ("tail", "middle", "head")


def bucket_of(counts: np.ndarray, edges: tuple[int, ...] = BUCKET_EDGES) -> np.ndarray:
    """Bucket index (0 tail, 1 middle, 2 head) of each per-identity training image count."""
    return np.searchsorted(np.asarray(edges), np.asarray(counts), side="right")


def rank1_correct(probe_features: np.ndarray, probe_identities: np.ndarray, gallery_features: np.ndarray,
                  gallery_identities: np.ndarray) -> np.ndarray:
    """Whether each probe's own identity has the strictly largest cosine in the gallery (unit rows in)."""
    similarity = probe_features @ gallery_features.T
    column = np.searchsorted(gallery_identities, probe_identities)  # gallery identities are sorted
    own = similarity[np.arange(similarity.shape[0]), column]
    similarity[np.arange(similarity.shape[0]), column] = -np.inf
    return own > similarity.max(axis=1)


def tail_metrics(gallery_features: np.ndarray, gallery_image_identities: np.ndarray,
                 probe_features: np.ndarray, probe_identities: np.ndarray, train_counts: dict[int, int],
                 edges: tuple[int, ...] = BUCKET_EDGES) -> dict[str, Any]:
    """Per-bucket rank-1 of probes against identity means (features flip-added or plain, not normalised).

    ``gallery_features[i]`` is a training image of identity ``gallery_image_identities[i]``; ``train_counts``
    maps each evaluated identity to its number of training images (which decides its bucket).
    """
    image_units = l2_normalise(np.asarray(gallery_features, dtype=np.float64))
    identities, index = np.unique(np.asarray(gallery_image_identities), return_inverse=True)
    sums = np.zeros((identities.shape[0], image_units.shape[1]))
    np.add.at(sums, index, image_units)
    means = l2_normalise(sums)
    probes = l2_normalise(np.asarray(probe_features, dtype=np.float64))
    probe_identities = np.asarray(probe_identities)
    if not np.isin(probe_identities, identities).all():
        raise ValueError("every probe identity needs training images in the gallery")
    correct = rank1_correct(probes, probe_identities, means, identities)
    probe_bucket = bucket_of(np.array([train_counts[int(i)] for i in probe_identities]), edges)
    lows = (1, *edges)
    highs = (*edges, None)
    buckets: dict[str, Any] = {}
    for b, name in enumerate(BUCKET_NAMES):
        chosen = probe_bucket == b
        ids = {int(i) for i in probe_identities[chosen]}
        buckets[name] = {
            "rank1": float(correct[chosen].mean()) if chosen.any() else None,
            "num_probes": int(chosen.sum()), "num_identities": len(ids),
            "train_images": {"min": lows[b], "max": None if highs[b] is None else highs[b] - 1},
        }
    return {"buckets": buckets, "rank1": float(correct.mean()), "num_probes": int(correct.shape[0]),
            "num_gallery": int(identities.shape[0]),
            "summary": {f"rank-1 {name}": buckets[name]["rank1"] for name in BUCKET_NAMES
                        if buckets[name]["rank1"] is not None}}


@PROTOCOLS.register("synth-tail")
class SynthTail:
    """Closed-set rank-1 of held-out images of training identities, per training-count bucket (SynthFace)."""

    name: ClassVar[str] = "synth-tail"
    headline: ClassVar[str] = "rank1"
    #: The runner passes the training set to protocols that declare they need it.
    needs_trainset: ClassVar[bool] = True
    #: Evaluated identities per bucket (a fixed random subset where a bucket has more).
    identities_per_bucket: ClassVar[int] = 100
    probes_per_identity: ClassVar[int] = 2
    seed: ClassVar[int] = 0

    def __init__(self, data: DataSettings, progress: bool = True, options: EvalSettings | None = None,
                 trainset: Any = None, input_size: int | None = None) -> None:
        from bench.data.catalog import build_trainset
        from bench.data.datasets import TrainSet
        from bench.data.synth_trainset import TRAIN_NAMESPACE, synthface_config
        from bench.data.synthface import SynthFace

        self.options = options or EvalSettings()
        if data.dataset != "synthface":
            raise DataError(f"synth-tail: SynthFace only for now (it renders unseen images of training "
                            f"identities); dataset '{data.dataset}' has no held-out images of its training "
                            f"identities (see bench/eval/synth_tail.py)")
        if trainset is None:  # bench eval: the split named by the data settings
            trainset = build_trainset(data, progress)
        if not isinstance(trainset, TrainSet):
            raise DataError("synth-tail: needs the in-memory SynthFace training set")
        identities = np.asarray(trainset.identities)
        present, counts = np.unique(identities, return_counts=True)
        rng = np.random.default_rng([self.seed, 11])
        chosen = []
        for b in range(len(BUCKET_NAMES)):
            members = present[bucket_of(counts, BUCKET_EDGES) == b]
            if members.shape[0] > self.identities_per_bucket:
                members = rng.choice(members, size=self.identities_per_bucket, replace=False)
            chosen.append(np.sort(members))
        self.identities = np.sort(np.concatenate(chosen))
        evaluated = set(self.identities.tolist())
        self.train_counts = {int(i): int(c) for i, c in zip(present, counts) if int(i) in evaluated}
        rows = np.flatnonzero(np.isin(identities, self.identities))
        self.gallery_images = trainset.images.index_select(0, torch.from_numpy(rows))
        self.gallery_identities = identities[rows]
        self.probe_identities = np.repeat(self.identities, self.probes_per_identity)
        probe_samples = HELD_OUT_SAMPLE_OFFSET + np.tile(np.arange(self.probes_per_identity), self.identities.shape[0])
        synth = SynthFace(synthface_config(data.synthface))
        self.probe_images = synth.render(torch.from_numpy(self.probe_identities),
                                         torch.from_numpy(probe_samples), TRAIN_NAMESPACE).images
        # Training images and probes are rendered at SynthFace's size; a model of another input size
        # (bench eval --input-size) gets them resized, as every protocol does, and the conventions say so.
        self.source_size = int(self.probe_images.shape[-1])
        self.input_size = eval_input_size(data, input_size)
        self.gallery_images = resize_images(self.gallery_images, self.input_size)
        self.probe_images = resize_images(self.probe_images, self.input_size)

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]:
        flip = self.options.flip
        gallery = extract_features(encoder, self.gallery_images, device, batch_size=batch_size, flip=flip)
        probes = extract_features(encoder, self.probe_images, device, batch_size=batch_size, flip=flip)
        return self._score(gallery, probes, flip)

    def score_features(self, features: Any, flip: bool | str = True) -> dict[str, Any]:
        """Metrics of features ``[G + P, D]``: the gallery's training images, then the probes, in this
        protocol's order (or a ``.npy`` holding them)."""
        rows = self.gallery_images.shape[0] + self.probe_images.shape[0]
        if not isinstance(features, np.ndarray):
            features = features_file(features, rows, "gallery training images, then held-out probes")
        split = self.gallery_images.shape[0]
        return self._score(features[:split], features[split:], flip)

    def _score(self, gallery: np.ndarray, probes: np.ndarray, flip: bool | str) -> dict[str, Any]:
        out = tail_metrics(gallery, self.gallery_identities, probes, self.probe_identities, self.train_counts)
        out["bucket_edges"] = {"tail": [1, BUCKET_EDGES[0]], "middle": list(BUCKET_EDGES),
                               "head": [BUCKET_EDGES[1], None], "rule": "train images n in [low, high)"}
        out["conventions"] = {
            "embedding": ("normalise(f(x) + f(flip(x)))" if flip is True else "normalise(f(x))"
                          if flip is False else f"normalise(features supplied by the user: {flip})"),
            "gallery": "per identity: normalised mean of its training-split images' unit embeddings",
            "probes": f"{self.probes_per_identity} newly rendered images per identity, SynthFace sample ids "
                      f">= {HELD_OUT_SAMPLE_OFFSET} (never in a training split)",
            "rank1": "own identity's mean strictly above every other gallery mean (ties count against)",
            "identities": f"at most {self.identities_per_bucket} per bucket, fixed seed {self.seed}",
            "images": f"{self.source_size}x{self.source_size} rendered" + (
                f", resized to {self.input_size}x{self.input_size} with antialiasing"
                if self.source_size != self.input_size else ""),
        }
        return out
