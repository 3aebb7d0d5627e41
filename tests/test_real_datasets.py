"""Dataset cards, locating the files, splits from labels alone, and the decoded-on-demand training set + loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_formats import image_array, png, ref_bin, write_im2rec, write_insightface

from bench.config import DataSettings, SplitSettings
from bench.data.catalog import DATASETS, build_trainset
from bench.data.datasets import TrainSet
from bench.data.encoded import EncodedDataset
from bench.data.loader import BatchLoader, normalise
from bench.data.real import CARD_DIR, EncodedTrainSet, card_for, load_card, locate
from bench.data.sampler import ClassBalancedBatchSampler, RandomBatchSampler
from bench.errors import DataError

# The table (insightface's dataset README and arcface_torch configs).
EXPECTED_CARDS = {
    "ms1mv2": (85_742, 5_822_653, "insightface"), "ms1mv3": (93_431, 5_179_510, "insightface"),
    "glint360k": (360_232, 17_091_657, "insightface"), "casia": (10_572, 490_623, "insightface"),
    "webface4m": (205_990, 4_235_242, "im2rec"), "webface12m": (617_970, 12_720_066, "im2rec"),
    "webface42m": (2_059_906, 42_474_557, "im2rec"),
}


def test_shipped_cards_and_registry() -> None:
    assert sorted(p.stem for p in CARD_DIR.glob("*.yaml")) == sorted(EXPECTED_CARDS)
    for name, (identities, images, layout) in EXPECTED_CARDS.items():
        card = load_card(CARD_DIR / f"{name}.yaml")
        assert (card.name, card.identities, card.images, card.image_size) == (name, identities, images, (112, 112))
        assert card.formats[0] == "recordio" and card.layouts["recordio"] == layout
        assert card.env == f"FACEBENCH_{name.upper()}" and card.obtain and card.source
        assert name in DATASETS
    assert "custom" in DATASETS and "synthface" in DATASETS


def _card(tmp_path, identities: int, images: int, fmt="recordio", layout="insightface", size=32, **extra) -> str:
    text = (f"name: tiny\ntitle: a test set\nformat: {fmt}\nlayout: {{{fmt}: {layout}}}\n"
            f"where: {{env: FACEBENCH_TINY_TEST, path: tiny}}\nidentities: {identities}\nimages: {images}\n"
            f"image_size: [{size}, {size}]\nobtain: written by the test. Nothing else.\n")
    text += "".join(f"{k}: {v}\n" for k, v in extra.items())
    (tmp_path / "tiny.yaml").write_text(text)
    return str(tmp_path / "tiny.yaml")


@pytest.mark.parametrize("bad, message", [
    ("size: 3\n", "unknown key 'size'"),
    ("format: tfrecord\n", "'format' must be one or a list of recordio, folder"),
    ("where: {env: X}\n", "'where' needs 'env'"),
    ("where: {env: X, path: /abs}\n", "'where.path' must be relative"),
])
def test_bad_cards_are_one_line_errors(tmp_path, bad, message) -> None:
    card = _card(tmp_path, 2, 4)
    lines = [line for line in open(card).read().splitlines() if not line.startswith(bad.split(":")[0] + ":")]
    open(card, "w").write("\n".join(lines) + "\n" + bad)
    with pytest.raises(DataError) as exc:
        load_card(card)
    assert message in str(exc.value) and card in str(exc.value) and "\n" not in str(exc.value)


def test_missing_data_says_what_to_set(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FACEBENCH_MS1MV2", raising=False)
    settings = DataSettings(dataset="ms1mv2", root=str(tmp_path))
    with pytest.raises(DataError) as exc:
        build_trainset(settings, progress=False)
    message = str(exc.value)
    assert "\n" not in message and "set FACEBENCH_MS1MV2=DIR (or --set data.path=DIR)" in message
    assert "train.rec, train.idx and property" in message and "ms1mv2.yaml" in message
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("FACEBENCH_MS1MV2", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match=r"no train.rec, train.idx and property in .*elsewhere \(from \$FACEBENCH_MS1MV2\)"):
        build_trainset(settings, progress=False)


def test_missing_data_of_a_two_format_card_reads_right(tmp_path, monkeypatch) -> None:
    """The whole one-line message for a card that takes a .rec or an image folder (webface4m).

    Catches the old typo "no an image folder" and any other garbling of the sentence.
    """
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FACEBENCH_WEBFACE4M", str(tmp_path / "empty"))
    with pytest.raises(DataError) as exc:
        locate(load_card(CARD_DIR / "webface4m.yaml"), DataSettings(dataset="webface4m", root=str(tmp_path)))
    wanted = ("train.rec, train.idx and property, or identity folders (<identity>/<image> or "
              "<shard>/<identity>/<image>)")
    assert str(exc.value).startswith(f"dataset webface4m: no {wanted} in {tmp_path / 'empty'} "
                                     f"(from $FACEBENCH_WEBFACE4M); set FACEBENCH_WEBFACE4M=DIR (or --set "
                                     f"data.path=DIR) to the folder holding {wanted}; ")
    assert "no an " not in str(exc.value) and "\n" not in str(exc.value)


def test_locate_order_path_then_env_then_root(tmp_path, monkeypatch) -> None:
    for name in ("a", "b", "root/tiny"):
        write_insightface(tmp_path / name, [[png(image_array(0))]])
    card = load_card(_card(tmp_path, 1, 1))
    monkeypatch.setenv("FACEBENCH_TINY_TEST", str(tmp_path / "b"))
    assert locate(card, DataSettings(path=str(tmp_path / "a"), root=str(tmp_path / "root"))) == tmp_path / "a"
    assert locate(card, DataSettings(root=str(tmp_path / "root"))) == tmp_path / "b"
    monkeypatch.delenv("FACEBENCH_TINY_TEST")
    assert locate(card, DataSettings(root=str(tmp_path / "root"))) == tmp_path / "root" / "tiny"


def _tiny_insightface(directory, counts=(3, 1, 4, 2, 5, 2), size=32):
    arrays = [[image_array(100 * c + i, size) for i in range(n)] for c, n in enumerate(counts)]
    write_insightface(directory, [[png(a) for a in group] for group in arrays], size=size)
    return [a for group in arrays for a in group]


def _longtail_counts_by_hand(counts: list[int], seed: int, keep_identities: int, exponent: float,
                             min_images: int) -> dict[int, int]:
    """Images per kept identity of the long-tail recipe as bench/data/splits.py documents it, recomputed
    plainly: stream (seed, 0) picks the identities, stream (seed, 1) draws one power-law count per identity
    id 0..largest kept id, each capped at what the identity has."""
    kept = sorted(np.random.default_rng([seed, 0]).choice(len(counts), size=keep_identities, replace=False))
    support = list(range(min_images, max(counts[c] for c in kept) + 1))
    weights = [n ** -exponent for n in support]
    draws = np.random.default_rng([seed, 1]).choice(support, size=max(kept) + 1,
                                                    p=[w / sum(weights) for w in weights])
    return {int(c): min(int(draws[c]), counts[c]) for c in kept}


def test_splits_come_from_labels_alone(tmp_path, monkeypatch) -> None:
    """Shallow and long-tail splits of a card dataset come from the labels (no image decoded but the one
    size check), are cached under the data root, and keep the recipe's per-identity counts.

    Catches: a split that decodes images; a shallow split keeping the wrong number per identity; a broken
    long-tail recipe (wrong exponent use, no cap, wrong stream or seed), checked identity by identity
    against :func:`_longtail_counts_by_hand`.
    """
    _tiny_insightface(tmp_path / "data")
    card = _card(tmp_path, 6, 17)
    decoded = []
    real_decode = EncodedDataset.decode
    monkeypatch.setattr(EncodedDataset, "decode", lambda self, index: decoded.append(index) or real_decode(self, index))
    settings = DataSettings(dataset="custom", card=card, path=str(tmp_path / "data"), root=str(tmp_path / "root"),
                            split=SplitSettings(name="shallow", seed=3))
    trainset = build_trainset(settings, progress=False)
    assert isinstance(trainset, EncodedTrainSet)
    # One decode only: the size check of the split's first image (a split that decoded images would do 17).
    assert decoded == [int(trainset.pool_indices[0])]
    assert trainset.info["split"]["images_per_identity"]["histogram"] == {"1": 1, "2": 5}
    assert trainset.info["card"]["matches"] and trainset.info["source"]["layout"] == "insightface"
    assert len(trainset) == 11 and trainset.num_classes == 6
    # Cached under the data root, keyed by the labels' hash and the recipe.
    assert len(list((tmp_path / "root" / "splits" / "tiny").rglob("shallow-*.npy"))) == 1
    longtail = build_trainset(DataSettings(dataset="custom", card=card, path=str(tmp_path / "data"),
                                           root=str(tmp_path / "root"),
                                           split=SplitSettings(name="longtail", max_identities=4)), progress=False)
    assert longtail.num_classes == 4 and longtail.info["split"]["recipe"]["exponent"] == 1.5
    kept, per_identity = np.unique(longtail.identities, return_counts=True)
    expected = _longtail_counts_by_hand([3, 1, 4, 2, 5, 2], seed=0, keep_identities=4, exponent=1.5, min_images=1)
    assert dict(zip(kept.tolist(), per_identity.tolist())) == expected


@pytest.mark.parametrize("seed, exponent, min_images", [(0, 1.5, 1), (7, 2.0, 2)])
def test_longtail_counts_match_the_documented_recipe_on_a_larger_pool(seed, exponent, min_images) -> None:
    """The long-tail split of a 300-identity pool (1-30 images each), identity by identity, against
    :func:`_longtail_counts_by_hand`. Catches what the 6-identity pool above is too small to tell apart:
    an exponent used with the wrong sign or scale, a wrong lower bound, draws in another order."""
    from bench.data.splits import make_split

    counts = np.random.default_rng(123).integers(1, 31, size=300).tolist()
    labels = np.repeat(np.arange(300), counts)
    split = make_split(labels, SplitSettings(name="longtail", seed=seed, longtail_exponent=exponent,
                                             longtail_min_images=min_images, max_identities=250))
    kept, per_identity = np.unique(labels[split.indices], return_counts=True)
    assert dict(zip(kept.tolist(), per_identity.tolist())) == _longtail_counts_by_hand(
        counts, seed, keep_identities=250, exponent=exponent, min_images=min_images)


def test_encoded_trainset_loads_exact_pixels_and_renumbered_labels(tmp_path) -> None:
    arrays = _tiny_insightface(tmp_path / "data")
    settings = DataSettings(dataset="custom", card=_card(tmp_path, 6, 17), path=str(tmp_path / "data"),
                            root=str(tmp_path / "root"), split=SplitSettings(max_identities=3, seed=1))
    trainset = build_trainset(settings, progress=False)
    pool = trainset.pool_indices
    pool_labels = np.repeat(np.arange(6), (3, 1, 4, 2, 5, 2))
    kept = np.unique(pool_labels[pool])
    assert len(kept) == 3 and trainset.num_classes == 3
    indices = np.array([len(trainset) - 1, 0, 2])
    images, labels = trainset.load(indices)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32)
    for row, index in enumerate(indices):
        expected = torch.from_numpy(arrays[pool[index]]).permute(2, 0, 1)
        assert torch.equal(images[row], expected)
        assert labels[row] == np.searchsorted(kept, pool_labels[pool[index]])


def test_loader_workers_give_the_same_batches_normalised_and_flipped(tmp_path) -> None:
    arrays = _tiny_insightface(tmp_path / "data")
    settings = DataSettings(dataset="custom", card=_card(tmp_path, 6, 17), path=str(tmp_path / "data"),
                            root=str(tmp_path / "root"))
    trainset = build_trainset(settings, progress=False)
    batches = {}
    for workers in (0, 2):
        loader = BatchLoader(trainset, RandomBatchSampler(len(trainset), 8, seed=5), torch.device("cpu"), seed=9,
                             workers=workers)
        batches[workers] = [next(loader) for _ in range(5)]
        loader.close()
    flipped = 0
    sampler = RandomBatchSampler(len(trainset), 8, seed=5)
    for number, ((images0, labels0), (images2, labels2)) in enumerate(zip(batches[0], batches[2])):
        assert torch.equal(images0, images2) and torch.equal(labels0, labels2)
        indices = sampler.batch(number)
        assert torch.equal(labels0, trainset.labels[indices])
        for row, index in enumerate(indices):
            # Independent normalisation: (x / 255 - 0.5) / 0.5 in float64.
            plain = torch.from_numpy((arrays[index].astype(np.float64) / 255 - 0.5) / 0.5).permute(2, 0, 1)
            if torch.allclose(images0[row].double(), plain, atol=1e-6):
                continue
            assert torch.allclose(images0[row].double(), plain.flip(-1), atol=1e-6)
            flipped += 1
    assert 8 <= flipped <= 32  # about half of 40 images


def test_loader_serves_class_balanced_batches(tmp_path) -> None:
    _tiny_insightface(tmp_path / "data")
    trainset = build_trainset(DataSettings(dataset="custom", card=_card(tmp_path, 6, 17), path=str(tmp_path / "data"),
                                           root=str(tmp_path / "root"), workers=0), progress=False)
    sampler = ClassBalancedBatchSampler(trainset.labels.numpy(), 6, 2, seed=0)
    images, labels = next(BatchLoader(trainset, sampler, torch.device("cpu"), seed=0))
    assert images.shape == (6, 3, 32, 32) and labels.view(3, 2)[:, 0].tolist() == labels.view(3, 2)[:, 1].tolist()


def test_in_memory_path_is_unchanged() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trainset = TrainSet(images=images, labels=torch.arange(10), identities=np.arange(10), num_classes=10)
    assert not trainset.decodes_on_demand
    loader = BatchLoader(trainset, iter([np.array([3, 1])]), torch.device("cpu"), seed=0, flip=False)
    got, labels = next(loader)
    assert torch.equal(got, normalise(images[[3, 1]])) and labels.tolist() == [3, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_errors_surface_through_the_loader_as_one_line(tmp_path, workers) -> None:
    images = [png(image_array(i, 32)) for i in range(4)]
    images[2] = b"\xff\xd8 broken"
    write_im2rec(tmp_path / "data", images, [0, 1, 0, 1], [0, 1, 2, 3], size=32)
    trainset = build_trainset(DataSettings(dataset="custom", card=_card(tmp_path, 2, 4, layout="im2rec"),
                                           path=str(tmp_path / "data"), root=str(tmp_path / "root"), workers=workers),
                              progress=False)
    loader = BatchLoader(trainset, iter([np.array([0, 2])]), torch.device("cpu"), seed=0)
    with pytest.raises(DataError, match="key 2 at offset .*: undecodable image") as exc:
        next(loader)
    assert "\n" not in str(exc.value)


def test_card_mismatch_is_recorded(tmp_path) -> None:
    _tiny_insightface(tmp_path / "data")
    trainset = build_trainset(DataSettings(dataset="custom", card=_card(tmp_path, 7, 17),
                                           path=str(tmp_path / "data"), root=str(tmp_path / "root")), progress=False)
    assert trainset.info["card"]["matches"] is False
    json.dumps(trainset.info)  # goes into data.json


def test_card_for_uses_the_override(tmp_path) -> None:
    card = _card(tmp_path, 1, 1)
    assert card_for(DataSettings(dataset="ms1mv2", card=card)).name == "tiny"
    assert card_for(DataSettings(dataset="ms1mv2")).name == "ms1mv2"


def _lfw_pack(path, size: int = 112, pairs: int = 20) -> None:
    """A ``.bin`` of ``size`` px images (insightface's packs are 112 px), written by the independent writer."""
    images = [png(image_array(7000 + k, size)) for k in range(2 * pairs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ref_bin(images, [k % 2 == 0 for k in range(pairs)]))


@pytest.mark.slow
def test_a_32px_pack_trains_and_evaluates_at_its_own_size(tmp_path, tiny_eval, monkeypatch) -> None:
    """Issue 12: a valid 32 x 32 pack with a ``custom`` card trains, then evaluates at 32 px.

    Catches: evaluation at a fixed 112 px for real data (the backbone, built at 32, failed with "mat1 and
    mat2 shapes cannot be multiplied" after the whole budget), evaluation at SynthFace's image size instead
    of the backbone's (set to 16 here so that the two differ), and conventions that hide a resize.
    """
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.records import iter_records

    _tiny_insightface(tmp_path / "data", size=32)
    _lfw_pack(tmp_path / "lfw.bin")
    monkeypatch.setenv("FACEBENCH_LFW", str(tmp_path / "lfw.bin"))
    result = CliRunner().invoke(app, [
        "run", "--methods", "arcface", "--dataset", "custom", "--eval", "lfw,synth-lfw", "--budget", "32",
        "--batch-size", "16", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "results"),
        "--data-root", str(tmp_path / "root"), "--set", f"data.card={_card(tmp_path, 6, 17)}",
        "--set", f"data.path={tmp_path / 'data'}", "--set", "data.workers=0", "--set", "train.embedding_size=16",
        "--set", "data.synthface.image_size=16"])
    assert result.exit_code == 0, result.output
    (record,) = iter_records(tmp_path / "results")
    metrics = record["metrics"]
    assert metrics["lfw"]["conventions"]["images"] == "112x112 from lfw.bin, resized to 32x32 with antialiasing"
    assert metrics["synth-lfw"]["conventions"]["images"] == \
        "16x16 from synth-lfw.bin, resized to 32x32 with antialiasing"
    assert metrics["lfw"]["num_pairs"] == 20 and len(metrics["lfw"]["fold_accuracies"]) == 10
