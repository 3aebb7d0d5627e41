"""The ``synth-tail`` protocol (long-tail diagnostic) against independent references, on a small long-tail
SynthFace split (60 identities x 20 pool images, power law 1.5: 208 training images).

Shows: the bucket rule ``tail [1, 3)``, ``middle [3, 10)``, ``head [10, inf)`` on hand-picked counts and on
the split, with identity and probe counts per bucket recounted by hand; the per-bucket identity cap is a
fixed subset of each bucket; the gallery is the training split's images of the evaluated identities (true
identities, also under label noise); the held-out probes are new renders (sample ids from
``HELD_OUT_SAMPLE_OFFSET``), equal to no image of the identity's pool; rank-1 recomputed in plain numpy for
a fixed linear encoder (with and without the flip test) and for hand-made features (a tie counts as a
miss); and one-line errors for a dataset it cannot render held-out images for and for a training set that
is not the in-memory SynthFace one. Without a training set it builds the split named by the settings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings, SplitSettings, SynthFaceSettings
from bench.data.catalog import build_trainset
from bench.data.datasets import TrainSet
from bench.data.synth_trainset import TRAIN_NAMESPACE, synthface_config
from bench.data.synthface import SynthFace
from bench.errors import DataError
from bench.eval import build_protocol
from bench.eval.synth_tail import HELD_OUT_SAMPLE_OFFSET, SynthTail, bucket_of

IDENTITIES, POOL_IMAGES, SIZE = 60, 20, 32


def _bucket_by_hand(count: int) -> str:
    if count < 3:
        return "tail"
    if count < 10:
        return "middle"
    return "head"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataSettings:
    return DataSettings(root=str(tmp_path_factory.mktemp("data")), split=SplitSettings(name="longtail"),
                        synthface=SynthFaceSettings(num_identities=IDENTITIES, images_per_identity=POOL_IMAGES,
                                                    image_size=SIZE))


@pytest.fixture(scope="module")
def trainset(data: DataSettings) -> TrainSet:
    return build_trainset(data, progress=False)


@pytest.fixture(scope="module")
def protocol(data: DataSettings, trainset: TrainSet) -> SynthTail:
    built = build_protocol("synth-tail", data, False, EvalSettings(), trainset)
    assert isinstance(built, SynthTail)
    return built


def _counts(trainset: TrainSet) -> dict[int, int]:
    counts: dict[int, int] = {}
    for identity in trainset.identities.tolist():
        counts[identity] = counts.get(identity, 0) + 1
    return counts


def test_bucket_edges_on_hand_picked_counts() -> None:
    counts = [1, 2, 3, 9, 10, 11, 40]
    assert bucket_of(np.array(counts)).tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert [_bucket_by_hand(c) for c in counts] == ["tail", "tail", "middle", "middle", "head", "head", "head"]


def test_identities_and_train_counts_per_bucket(protocol: SynthTail, trainset: TrainSet) -> None:
    counts = _counts(trainset)
    by_bucket = {name: sorted(i for i, c in counts.items() if _bucket_by_hand(c) == name)
                 for name in ("tail", "middle", "head")}
    # this split (seeded): 42 tail, 11 middle, 7 head identities; under the cap of 100, all are evaluated
    assert {name: len(ids) for name, ids in by_bucket.items()} == {"tail": 42, "middle": 11, "head": 7}
    assert sum(counts.values()) == len(trainset) == 208 and max(counts.values()) <= POOL_IMAGES
    assert protocol.identities.tolist() == sorted(counts)
    assert protocol.train_counts == counts
    assert protocol.probe_identities.tolist() == [i for i in sorted(counts) for _ in range(2)]


def test_gallery_is_the_training_images_of_the_evaluated_identities(protocol: SynthTail, trainset: TrainSet) -> None:
    assert torch.equal(protocol.gallery_images, trainset.images)  # every identity is evaluated here
    assert protocol.gallery_identities.tolist() == trainset.identities.tolist()


def test_identity_cap_picks_a_fixed_subset_of_each_bucket(monkeypatch: pytest.MonkeyPatch, data: DataSettings,
                                                          trainset: TrainSet) -> None:
    monkeypatch.setattr(SynthTail, "identities_per_bucket", 5)
    first = build_protocol("synth-tail", data, False, EvalSettings(), trainset)
    again = build_protocol("synth-tail", data, False, EvalSettings(), trainset)
    assert first.identities.tolist() == again.identities.tolist()  # fixed seed
    counts = _counts(trainset)
    chosen = {name: [i for i in first.identities.tolist() if _bucket_by_hand(counts[i]) == name]
              for name in ("tail", "middle", "head")}
    assert {name: len(ids) for name, ids in chosen.items()} == {"tail": 5, "middle": 5, "head": 5}
    # the gallery is exactly the training images of the 15 chosen identities, in training-set order
    rows = [k for k, i in enumerate(trainset.identities.tolist()) if i in set(first.identities.tolist())]
    assert first.gallery_identities.tolist() == trainset.identities[rows].tolist()
    assert torch.equal(first.gallery_images, trainset.images[rows])
    assert first.gallery_images.shape[0] == sum(counts[i] for i in first.identities.tolist())


def test_probes_are_new_renders_not_pool_images(protocol: SynthTail, data: DataSettings) -> None:
    synth = SynthFace(synthface_config(data.synthface))
    identities = torch.from_numpy(protocol.identities)
    for k in range(protocol.probes_per_identity):
        expected = synth.render(identities, torch.full_like(identities, HELD_OUT_SAMPLE_OFFSET + k),
                                TRAIN_NAMESPACE).images
        assert torch.equal(protocol.probe_images[k::protocol.probes_per_identity], expected)
    # no probe equals any of its identity's pool images (samples 0 .. 19: every image any split can hold)
    pool = synth.render(identities.repeat_interleave(POOL_IMAGES), torch.arange(POOL_IMAGES).repeat(len(identities)),
                        TRAIN_NAMESPACE).images.view(len(identities), POOL_IMAGES, -1)
    probes = protocol.probe_images.view(len(identities), protocol.probes_per_identity, -1)
    same = (probes[:, :, None, :] == pool[:, None, :, :]).all(-1)
    assert not same.any()
    # and the probes are not the training images themselves (no probe row equals a gallery row)
    gallery = protocol.gallery_images.flatten(1)
    assert not (protocol.probe_images.flatten(1)[:, None] == gallery[None]).all(-1).any()


def test_gallery_uses_true_identities_under_label_noise(data: DataSettings) -> None:
    noisy = replace(data, synthface=replace(data.synthface, label_noise=0.3))
    trainset = build_trainset(noisy, progress=False)
    labels = trainset.labels.numpy()
    _, clean = np.unique(trainset.identities, return_inverse=True)
    assert (labels != clean).sum() == round(0.3 * len(trainset))  # the labels are noisy ...
    built = build_protocol("synth-tail", noisy, False, EvalSettings(), trainset)
    assert built.gallery_identities.tolist() == trainset.identities.tolist()  # ... the gallery is not


class FixedProjection(nn.Module):
    """A deterministic encoder: a fixed random linear map of the pixels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.weight.t()


def _rank1_by_hand(weight: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray, probes: np.ndarray,
                   probe_ids: np.ndarray, flip: bool) -> tuple[list[bool], float]:
    """Correct-or-not per probe, and the smallest |own - best other| cosine gap, in float64 loops."""

    def features(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float64) / 127.5 - 1.0           # the loader's normalisation to [-1, 1]
        out = x.reshape(len(x), -1) @ weight.T
        if flip:
            out = out + x[..., ::-1].reshape(len(x), -1) @ weight.T  # mirror the width axis
        return out

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    gallery_f, probe_f = features(gallery), features(probes)
    means = {}
    for identity in sorted(set(gallery_ids.tolist())):
        total = np.zeros(weight.shape[0])
        for row, owner in zip(gallery_f, gallery_ids):
            if owner == identity:
                total += unit(row)
        means[identity] = unit(total)
    correct, gap = [], np.inf
    for row, owner in zip(probe_f, probe_ids):
        p = unit(row)
        own = float(p @ means[int(owner)])
        best_other = max(float(p @ m) for identity, m in means.items() if identity != owner)
        correct.append(own > best_other)
        gap = min(gap, abs(own - best_other))
    return correct, gap


@pytest.mark.parametrize("flip", [False, True])
def test_rank1_matches_a_plain_numpy_computation(protocol: SynthTail, flip: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 3 * SIZE * SIZE, generator=generator, dtype=torch.float64)
    encoder = FixedProjection(weight.float())
    protocol.options = EvalSettings(flip=flip)
    try:
        result = protocol.evaluate(encoder, torch.device("cpu"), batch_size=50)
    finally:
        protocol.options = EvalSettings()
    correct, gap = _rank1_by_hand(weight.numpy(), protocol.gallery_images.numpy(), protocol.gallery_identities,
                                  protocol.probe_images.numpy(), protocol.probe_identities, flip)
    assert gap > 1e-5  # no near-tie that float32 features could flip
    counts = protocol.train_counts
    for name in ("tail", "middle", "head"):
        mine = [c for c, i in zip(correct, protocol.probe_identities) if _bucket_by_hand(counts[int(i)]) == name]
        bucket = result["buckets"][name]
        assert bucket["num_probes"] == len(mine) == 2 * {"tail": 42, "middle": 11, "head": 7}[name]
        assert bucket["rank1"] == pytest.approx(sum(mine) / len(mine), abs=1e-12)
        assert result["summary"][f"rank-1 {name}"] == bucket["rank1"]
    assert result["rank1"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert 0.0 < result["rank1"] < 1.0  # an informative case: some probes right, some wrong
    assert result["num_gallery"] == 60 and result["num_probes"] == 120
    assert result["conventions"]["embedding"] == ("normalise(f(x) + f(flip(x)))" if flip else "normalise(f(x))")


def test_rank1_of_hand_made_features_counts_ties_as_misses(protocol: SynthTail) -> None:
    """Gallery image of identity k: the unit vector e_k. Probes: tail identities one exact (hit) and one
    halfway to the next identity (a tie: miss); middle identities two exact (hits); head identities two
    pointing at the next identity (misses). Expected rank-1: tail 1/2, middle 1, head 0."""
    identities = protocol.identities.tolist()
    column = {identity: k for k, identity in enumerate(identities)}
    eye = np.eye(len(identities))
    gallery = eye[[column[int(i)] for i in protocol.gallery_identities]]
    probes = []
    for identity in protocol.probe_identities.tolist():
        own, other = eye[column[identity]], eye[(column[identity] + 1) % len(identities)]
        bucket = _bucket_by_hand(protocol.train_counts[identity])
        first = len(probes) % 2 == 0
        probes.append(own if bucket == "middle" or (bucket == "tail" and first)
                      else own + other if bucket == "tail" else other)
    result = protocol.score_features(np.vstack([gallery, np.array(probes)]).astype(np.float32), flip=False)
    assert {name: b["rank1"] for name, b in result["buckets"].items()} == {"tail": 0.5, "middle": 1.0, "head": 0.0}
    assert {name: b["num_identities"] for name, b in result["buckets"].items()} == {"tail": 42, "middle": 11,
                                                                                    "head": 7}
    assert result["rank1"] == pytest.approx((42 * 1 + 11 * 2) / 120)
    assert {name: b["train_images"] for name, b in result["buckets"].items()} == {
        "tail": {"min": 1, "max": 2}, "middle": {"min": 3, "max": 9}, "head": {"min": 10, "max": None}}


def test_without_a_trainset_builds_the_split_from_the_settings(data: DataSettings, protocol: SynthTail) -> None:
    built = build_protocol("synth-tail", data, False, EvalSettings(), None)  # bench eval: no run's trainset
    assert built.identities.tolist() == protocol.identities.tolist()
    assert torch.equal(built.gallery_images, protocol.gallery_images)


def test_real_dataset_is_a_clear_error(data: DataSettings) -> None:
    with pytest.raises(DataError, match=r"^synth-tail: SynthFace only for now .*dataset 'webface' has no held-out "
                                        r"images of its training identities"):
        build_protocol("synth-tail", replace(data, dataset="webface"), False, EvalSettings(), None)


def test_trainset_that_is_not_in_memory_synthface_is_a_clear_error(data: DataSettings) -> None:
    class OnDemand:  # what a real, decoded-on-demand training set looks like to the protocol
        decodes_on_demand = True

    with pytest.raises(DataError, match=r"^synth-tail: needs the in-memory SynthFace training set$"):
        build_protocol("synth-tail", data, False, EvalSettings(), OnDemand())


def test_features_file_of_the_wrong_size_is_a_clear_error(protocol: SynthTail, tmp_path: Path) -> None:
    path = tmp_path / "f.npy"
    np.save(path, np.zeros((5, 4), np.float32))
    rows = protocol.gallery_images.shape[0] + protocol.probe_images.shape[0]
    with pytest.raises(DataError, match=rf"expected features \[{rows}, D\] \(gallery training images, then "
                                        rf"held-out probes\), got shape \[5, 4\]"):
        protocol.score_features(path)
