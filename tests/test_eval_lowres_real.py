"""TinyFace and QMUL-SurvFace: the readers against the independent writers of ``tests/data_formats.py``, the
library's writers against its readers (and scipy directly), :func:`load_resized` against ``F.interpolate``,
and both protocols end to end on tiny hand-designed benchmarks whose metrics are computed by hand.

The toy encoder (:class:`RedAngle`) maps an image to the unit vector at ``mean red / 2`` degrees, so the
cosine of two solid-colour images is ``cos((red1 - red2) / 2 degrees)``: scores order exactly as the red
values' distances, and every expected number below is reasoned from those distances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_formats import (
    ref_image_file,
    ref_read_cell,
    ref_survface_identification,
    ref_survface_verification,
    ref_tinyface,
)
from scipy.io import loadmat, savemat
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import BENCHMARK_DEFAULTS, PROTOCOLS, build_protocol, check_available
from bench.eval.formats.images import read_array
from bench.eval.formats.survface import (
    read_survface_identification,
    read_survface_verification,
    write_survface_identification,
    write_survface_verification,
)
from bench.eval.formats.tinyface import read_tinyface, write_tinyface
from bench.eval.lowres_real import at_rank, load_resized, tinyface_ranks
from bench.eval.metrics import OpenSetScores, tpir_from_scores

SIZES = [(12, 10), (16, 14), (9, 20), (30, 24)]


class RedAngle(nn.Module):
    """Image -> the unit vector at (mean red value) / 2 degrees (flip-invariant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = (x[:, 0].double().mean(dim=(1, 2)) + 1.0) * 127.5
        theta = torch.deg2rad(red / 2)
        return torch.stack([theta.cos(), theta.sin()], dim=1).float()


def solid(red: int, index: int = 0) -> np.ndarray:
    """A solid-colour HWC image of red value ``red``, of one of a few native low-resolution sizes."""
    height, width = SIZES[index % len(SIZES)]
    return np.broadcast_to(np.array([red, 90, 40], dtype=np.uint8), (height, width, 3)).copy()


def noise(seed: int, height: int = 11, width: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# load_resized
# ----------------------------------------------------------------------------------------------------


def test_load_resized_matches_a_direct_antialiased_interpolate(tmp_path):
    """Images of several stored sizes (one already at the target) come back uint8 [N, 3, S, S] in the given
    order, each equal to its own antialiased bilinear F.interpolate. Catches a lost order when grouping by
    size, a plain (aliased) or nearest resize, a transposed channel layout and a resize of an image already
    at the target size."""
    shapes = [(11, 9), (24, 30), (11, 9), (16, 16), (5, 7)]
    paths = []
    for index, (height, width) in enumerate(shapes):
        paths.append(tmp_path / f"{index}.png")
        ref_image_file(paths[-1], noise(index, height, width))
    out = load_resized(paths, 16)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (5, 3, 16, 16)
    for index, path in enumerate(paths):
        image = torch.from_numpy(np.asarray(read_array(path)).transpose(2, 0, 1).copy())[None].float()
        if image.shape[-2:] == (16, 16):
            expected = image
        else:
            expected = F.interpolate(image, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        assert torch.equal(out[index], expected.round().clamp(0, 255).to(torch.uint8)[0]), index
    assert torch.equal(out[3], torch.from_numpy(noise(3, 16, 16).transpose(2, 0, 1).copy()))
    assert tuple(load_resized(paths[:1], 4).shape) == (1, 3, 4, 4)


def test_load_resized_unreadable_file_is_one_line_naming_it(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    ref_image_file(good, noise(0))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as info:
        load_resized([good, bad], 8)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)
    with pytest.raises(DataError, match=f"{tmp_path / 'missing.png'}: cannot read image"):
        load_resized([tmp_path / "missing.png"], 8)


# ----------------------------------------------------------------------------------------------------
# TinyFace files
# ----------------------------------------------------------------------------------------------------


def _tinyface_entries():
    probes = [("3_1.jpg", 3, noise(1)), ("7_2.jpg", 7, noise(2)), ("3_4.jpg", 3, noise(3))]
    gallery = [("7_1.jpg", 7, noise(4)), ("3_2.jpg", 3, noise(5)), ("3_3.jpg", 3, noise(6))]
    distractors = [("b/0002.jpg", noise(7)), ("a/0009.jpg", noise(8)), ("0005.jpg", noise(9))]
    return probes, gallery, distractors


@pytest.mark.parametrize("mat_folder", ["Testing_Set", "Face_Identification_Evaluation"])
def test_read_tinyface_reads_the_published_layout(tmp_path, mat_folder):
    """The independent writer's folder (uint16 id columns, names cells, lists in Testing_Set/ or in the
    evaluation-code folder): .mat orders kept, ids int64, distractors found recursively in sorted order,
    absolute paths; the same set from Testing_Set itself and from a folder holding tinyface/. Catches swapped
    variables, lost orders, ids of the wrong dtype and an unstable distractor order."""
    probes, gallery, distractors = _tinyface_entries()
    root = ref_tinyface(tmp_path / "tinyface", probes, gallery, distractors, mat_folder=mat_folder)
    testing = root / "Testing_Set"
    for given in (root, testing, tmp_path):
        s = read_tinyface(given)
        assert s.probe_paths == [testing / "Probe" / n for n, _, _ in probes]
        assert s.gallery_paths == [testing / "Gallery_Match" / n for n, _, _ in gallery]
        assert s.probe_ids.tolist() == [3, 7, 3] and s.probe_ids.dtype == np.int64
        assert s.gallery_ids.tolist() == [7, 3, 3] and s.gallery_ids.dtype == np.int64
        assert s.distractor_paths == [testing / "Gallery_Distractor" / n for n in ("0005.jpg", "a/0009.jpg",
                                                                                    "b/0002.jpg")]


def test_write_tinyface_round_trips_and_writes_the_published_mat_files(tmp_path):
    """The library's writer: images of several sizes come back pixel for pixel (PNG), ids and orders round
    trip through the reader, and scipy sees the published variables: N x 1 cells of names and N x 1 id
    columns in Testing_Set/. Catches a wrong variable name or shape, names that disagree with the files and
    a distractor order that the reader does not keep."""
    probes = [noise(i, *SIZES[i % 4]) for i in range(3)]
    gallery = [noise(10 + i, *SIZES[(i + 1) % 4]) for i in range(4)]
    distractors = [noise(20 + i) for i in range(12)]
    write_tinyface(tmp_path, probes, [5, 2, 5], gallery, [2, 5, 5, 9], distractors)
    s = read_tinyface(tmp_path)
    assert s.probe_ids.tolist() == [5, 2, 5] and s.gallery_ids.tolist() == [2, 5, 5, 9]
    for paths, images in ((s.probe_paths, probes), (s.gallery_paths, gallery), (s.distractor_paths, distractors)):
        assert [np.array_equal(read_array(p), im) for p, im in zip(paths, images)] == [True] * len(images)
    testing = tmp_path / "Testing_Set"
    gallery_mat = loadmat(str(testing / "gallery_match_img_ID_pairs.mat"))
    assert gallery_mat["gallery_set"].shape == (4, 1) and gallery_mat["gallery_ids"].shape == (4, 1)
    assert [row[0] for row in ref_read_cell(testing / "gallery_match_img_ID_pairs.mat", "gallery_set")] == \
        [p.name for p in s.gallery_paths]
    assert gallery_mat["gallery_ids"].ravel().tolist() == [2, 5, 5, 9]
    probe_mat = loadmat(str(testing / "probe_img_ID_pairs.mat"))
    assert probe_mat["probe_set"].shape == (3, 1) and probe_mat["probe_ids"].ravel().tolist() == [5, 2, 5]
    assert all(p.name.startswith(f"{i}_") for p, i in zip(s.probe_paths, [5, 2, 5]))


def test_tinyface_reader_refuses_inconsistent_lists(tmp_path):
    """Names and ids of different lengths, a probe whose identity has no gallery image, and a non-integer id:
    one line naming the .mat file. Catches a reader that truncates to the shorter list or lets a probe
    without a mate through (its rank would be meaningless)."""
    probes, gallery, distractors = _tinyface_entries()
    root = ref_tinyface(tmp_path, probes, gallery, distractors)
    mat = root / "Testing_Set" / "probe_img_ID_pairs.mat"
    savemat(str(mat), {"probe_set": np.array([["3_1.jpg"], ["7_2.jpg"]], dtype=object),
                       "probe_ids": np.array([[3.0]])})
    with pytest.raises(DataError, match=f"^{mat}: 2 names in 'probe_set' but 1 ids in 'probe_ids'$"):
        read_tinyface(root)
    savemat(str(mat), {"probe_set": np.array([["3_1.jpg"]], dtype=object), "probe_ids": np.array([[4.0]])})
    with pytest.raises(DataError, match=f"^{mat}: probe 3_1.jpg \\(row 1\\) has id 4, which no image of"):
        read_tinyface(root)
    savemat(str(mat), {"probe_set": np.array([["3_1.jpg"]], dtype=object), "probe_ids": np.array([[3.5]])})
    with pytest.raises(DataError, match=f"^{mat}: 'probe_ids' holds values that are not whole numbers$"):
        read_tinyface(root)


# ----------------------------------------------------------------------------------------------------
# QMUL-SurvFace files
# ----------------------------------------------------------------------------------------------------


def test_read_survface_verification_reads_the_published_layout(tmp_path):
    """The independent writer's pair cells: each image once in order of first appearance (positives first),
    pairs indexing it, positives flagged and listed first; also from a folder holding QMUL-SurvFace/ and from
    the test folder itself. Catches swapped pair columns, duplicated images and negatives read as positives."""
    images = {f"{n}_cam1_{n}.jpg": noise(n) for n in range(1, 6)}
    positives = [("1_cam1_1.jpg", "2_cam1_2.jpg"), ("3_cam1_3.jpg", "1_cam1_1.jpg")]
    negatives = [("4_cam1_4.jpg", "2_cam1_2.jpg"), ("5_cam1_5.jpg", "3_cam1_3.jpg"), ("1_cam1_1.jpg", "5_cam1_5.jpg")]
    folder = ref_survface_verification(tmp_path / "QMUL-SurvFace", images, positives, negatives)
    for given in (tmp_path / "QMUL-SurvFace", tmp_path, folder):
        v = read_survface_verification(given)
        order = ["1_cam1_1.jpg", "2_cam1_2.jpg", "3_cam1_3.jpg", "4_cam1_4.jpg", "5_cam1_5.jpg"]
        assert v.image_paths == [folder / "verification_images" / n for n in order]
        assert v.pairs.tolist() == [[0, 1], [2, 0], [3, 1], [4, 2], [0, 4]] and v.pairs.dtype == np.int64
        assert v.issame.tolist() == [True, True, False, False, False] and v.issame.dtype == bool


@pytest.mark.parametrize("mat_folder", ["Face_Identification_Test_Set", "Face_Identification_Evaluation"])
def test_read_survface_identification_reads_the_published_layout(tmp_path, mat_folder):
    """The independent writer's gallery and mated-probe lists (double id columns, in the test folder or the
    evaluation-code folder) and an unmated_probe/ folder: .mat orders, then the unmated probes sorted with id
    -1. Catches mated and gallery lists swapped, unmated probes given a real id, and an unstable order."""
    gallery = [("8_cam1_1.jpg", 8, noise(1)), ("2_cam2_1.jpg", 2, noise(2)), ("8_cam3_2.jpg", 8, noise(3))]
    mated = [("2_cam1_5.jpg", 2, noise(4)), ("8_cam2_9.jpg", 8, noise(5))]
    unmated = [("distractors_10.jpg", noise(6)), ("5_cam1_1.jpg", noise(7)), ("distractors_2.jpg", noise(8))]
    folder = ref_survface_identification(tmp_path, gallery, mated, unmated, mat_folder=mat_folder)
    s = read_survface_identification(tmp_path)
    assert s.gallery_paths == [folder / "gallery" / n for n, _, _ in gallery]
    assert s.gallery_ids.tolist() == [8, 2, 8] and s.gallery_ids.dtype == np.int64
    assert s.probe_paths == [folder / "mated_probe" / n for n, _, _ in mated] + [
        folder / "unmated_probe" / n for n in ("5_cam1_1.jpg", "distractors_10.jpg", "distractors_2.jpg")]
    assert s.probe_ids.tolist() == [2, 8, -1, -1, -1] and s.probe_ids.dtype == np.int64


def test_survface_writers_round_trip_and_write_the_published_mat_files(tmp_path):
    """The library's writers: pixels back exactly (PNG), pairs and ids through the readers, and scipy sees
    ``P x 2`` name cells and ``N x 1`` id lists under the published variable names. Catches pairs written by
    position instead of name, a wrong cell shape and an unmated order the reader does not keep."""
    images = [noise(i, *SIZES[i % 4]) for i in range(4)]
    names = ["a_1.png", "b_1.png", "c_1.png", "d_1.png"]
    write_survface_verification(tmp_path, images, names, [(0, 1), (2, 3)], [(1, 2), (3, 0), (0, 2)])
    v = read_survface_verification(tmp_path)
    assert [p.name for p in v.image_paths] == names
    assert [np.array_equal(read_array(p), im) for p, im in zip(v.image_paths, images)] == [True] * 4
    assert v.pairs.tolist() == [[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]]
    assert v.issame.tolist() == [True, True, False, False, False]
    folder = tmp_path / "Face_Verification_Test_Set"
    assert loadmat(str(folder / "positive_pairs_names.mat"))["positive_pairs_names"].shape == (2, 2)
    assert ref_read_cell(folder / "negative_pairs_names.mat", "negative_pairs_names") == [
        ["b_1.png", "c_1.png"], ["d_1.png", "a_1.png"], ["a_1.png", "c_1.png"]]

    gallery, mated = [noise(10 + i) for i in range(3)], [noise(20), noise(21)]
    unmated = [noise(30 + i) for i in range(11)]
    write_survface_identification(tmp_path, gallery, [4, 6, 4], mated, [6, 4], unmated)
    s = read_survface_identification(tmp_path)
    assert s.gallery_ids.tolist() == [4, 6, 4] and s.probe_ids.tolist() == [6, 4] + [-1] * 11
    for paths, expected in ((s.gallery_paths, gallery), (s.probe_paths, mated + unmated)):
        assert [np.array_equal(read_array(p), im) for p, im in zip(paths, expected)] == [True] * len(expected)
    test_set = tmp_path / "Face_Identification_Test_Set"
    content = loadmat(str(test_set / "mated_probe_img_ID_pairs.mat"))
    assert content["mated_probe_set"].shape == (2, 1) and content["mated_probe_ids"].ravel().tolist() == [6, 4]
    assert loadmat(str(test_set / "gallery_img_ID_pairs.mat"))["gallery_ids"].shape == (3, 1)


def test_survface_reader_refuses_bad_pair_cells_and_unknown_mates(tmp_path):
    """A pair cell that is not N x 2, a mated probe whose id has no gallery image, and no unmated probe: one
    line naming the .mat file or folder."""
    folder = ref_survface_verification(tmp_path, {"a.jpg": noise(0), "b.jpg": noise(1)}, [("a.jpg", "b.jpg")],
                                       [("b.jpg", "a.jpg")])
    savemat(str(folder / "positive_pairs_names.mat"),
            {"positive_pairs_names": np.array([["a.jpg", "b.jpg", "a.jpg"]], dtype=object)})
    with pytest.raises(DataError, match=f"^{folder / 'positive_pairs_names.mat'}: 'positive_pairs_names' has "
                                        f"shape \\[1, 3\\], expected an N x 2 cell"):
        read_survface_verification(tmp_path)
    ident = ref_survface_identification(tmp_path, [("1_a.jpg", 1, noise(2))], [("2_a.jpg", 2, noise(3))], [])
    with pytest.raises(DataError, match=f"^{ident / 'mated_probe_img_ID_pairs.mat'}: mated probe 2_a.jpg \\(row 1\\) "
                                        f"has id 2, which no image of"):
        read_survface_identification(tmp_path)
    ref_survface_identification(tmp_path, [("1_a.jpg", 1, noise(2))], [("1_b.jpg", 1, noise(3))], [])
    with pytest.raises(DataError, match=f"^{ident / 'unmated_probe'}: no unmated probe image; open-set"):
        read_survface_identification(tmp_path)


# ----------------------------------------------------------------------------------------------------
# TinyFace protocol end to end
# ----------------------------------------------------------------------------------------------------

# (probe name, id, red): expected rank in the comments (distance = |red difference|; a smaller distance is a
# strictly higher cosine, equal reds are an exact tie)
TF_PROBES = [
    ("1_p1.png", 1, 10),   # best mate 12 (d 2); non-mates closer: distractors 9 and 11 (d 1) -> rank 3
    ("2_p1.png", 2, 100),  # best mate 95 (d 5); no non-mate within 5 -> rank 1
    ("3_p1.png", 3, 200),  # mate 200 (d 0) ties distractor 200 (ties count against) -> rank 2
    ("1_p2.png", 1, 50),   # best mate 60 (d 10); distractors 41 42 45 55 57 59 closer -> rank 7
    ("2_p2.png", 2, 150),  # best mate 130 (d 20); the 21 distractors 140..160 closer -> rank 22
]
TF_GALLERY = [("1_g1.png", 1, 12), ("1_g2.png", 1, 60), ("2_g1.png", 2, 130), ("3_g1.png", 3, 200),
              ("2_g2.png", 2, 95)]
TF_DISTRACTORS = [9, 11, 200, 41, 42, 45, 55, 57, 59] + list(range(140, 161))


def _write_tinyface_benchmark(root: Path) -> Path:
    return ref_tinyface(
        root,
        [(n, i, solid(r, k)) for k, (n, i, r) in enumerate(TF_PROBES)],
        [(n, i, solid(r, k + 1)) for k, (n, i, r) in enumerate(TF_GALLERY)],
        [(f"{k:04d}.png", solid(r, k + 2)) for k, r in enumerate(TF_DISTRACTORS)],
    )


def _red_features(images: torch.Tensor) -> np.ndarray:
    return RedAngle()(images.float() / 127.5 - 1.0).numpy()


def test_tinyface_protocol_ranks_as_hand_computed(tmp_path, monkeypatch):
    """Rank-1/5/20 of 5 probes whose ranks are 3, 1, 2, 7, 22 (comments of TF_PROBES): 1/5, 3/5, 4/5, with the
    distractors in the gallery. The same numbers from a features .npy, from an independent brute-force
    count, and the record's counts and conventions. Catches distractors left out of the gallery (P4 and P5
    would rise), a probe's other mate images counted as non-mates, ties counted for the probe (P3), the
    identity-level rank of a merged gallery, and a feature-row order that disagrees with the reader's."""
    folder = _write_tinyface_benchmark(tmp_path / "tf")
    monkeypatch.setenv("FACEBENCH_TINYFACE", str(folder))
    protocol = build_protocol("tinyface", DataSettings(root=str(tmp_path / "no-root")), progress=False, input_size=16)
    out = protocol.evaluate(RedAngle(), torch.device("cpu"), batch_size=7)
    assert out["rank"] == {"1": 0.2, "5": 0.6, "20": 0.8}
    assert out["summary"] == {"rank-1": 0.2, "rank-5": 0.6, "rank-20": 0.8}
    assert out["counts"] == {"probes": 5, "gallery_match": 5, "distractors": 30, "gallery": 35, "identities": 3}
    conventions = out["conventions"]
    assert conventions["feature"] == "normalise(f(x) + f(flip(x)))"
    assert "distractors in the gallery" in conventions["gallery"] and "-100" in conventions["gallery"]
    assert "(4 stored sizes from 12x10 to 30x24 (HxW)) resized straight to 16x16" in conventions["resize"]
    assert "antialiased bilinear" in conventions["resize"] and "upsampling" in conventions["resize"]

    features = _red_features(protocol.images)
    np.save(tmp_path / "features.npy", features)
    again = protocol.score_features(tmp_path / "features.npy", flip="precomputed")
    assert again["rank"] == out["rank"] and "resize" not in again["conventions"]
    # an independent count: 1 + non-mates (other identities' images and distractors) scoring >= the best mate
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    probe_ids = [i for _, i, _ in TF_PROBES]
    gallery_ids = [i for _, i, _ in TF_GALLERY] + [-100] * len(TF_DISTRACTORS)
    found = []
    for p, pid in enumerate(probe_ids):
        scores = unit[5:] @ unit[p]
        best = max(s for s, g in zip(scores, gallery_ids) if g == pid)
        found.append(1 + sum(1 for s, g in zip(scores, gallery_ids) if g != pid and s >= best))
    assert found == [3, 1, 2, 7, 22]
    assert tinyface_ranks(features[:5], np.array(probe_ids), features[5:], np.array(gallery_ids), block=2) == \
        {1: 0.2, 5: 0.6, 20: 0.8}


def test_tinyface_found_under_the_data_root_and_without_flip(tmp_path, monkeypatch):
    """``<data root>/eval/tinyface`` is found without the variable, ``check_available`` passes, and with
    eval.flip=false the ranks are the same (the toy encoder is flip-invariant) and the record says no flip."""
    monkeypatch.delenv("FACEBENCH_TINYFACE", raising=False)
    assert BENCHMARK_DEFAULTS["tinyface"] == "tinyface" and BENCHMARK_DEFAULTS["survface"] == "QMUL-SurvFace"
    data = DataSettings(root=str(tmp_path))
    with pytest.raises(DataError, match="set FACEBENCH_TINYFACE=DIR or put tinyface under <data root>/eval/; "
                                        "obtain it yourself: the TinyFace archive"):
        check_available("tinyface", data)
    _write_tinyface_benchmark(tmp_path / "eval" / "tinyface")
    check_available("tinyface", data)
    protocol = PROTOCOLS.get("tinyface")(data, progress=False, options=EvalSettings(flip=False), input_size=8)
    out = protocol.evaluate(RedAngle(), torch.device("cpu"), batch_size=64)
    assert out["rank"] == {"1": 0.2, "5": 0.6, "20": 0.8}
    assert out["conventions"]["feature"] == "normalise(f(x)) (no flip test)"


def test_tinyface_streams_images_when_they_do_not_fit_the_cache(tmp_path, monkeypatch):
    """With a zero-byte image cache the images are decoded per chunk at evaluation, same numbers."""
    from bench.eval import lowres_real

    monkeypatch.setattr(lowres_real, "IMAGE_CACHE_BYTES", 0)
    monkeypatch.setattr(lowres_real, "STREAM_CHUNK", 4)
    monkeypatch.setenv("FACEBENCH_TINYFACE", str(_write_tinyface_benchmark(tmp_path)))
    protocol = build_protocol("tinyface", DataSettings(root=str(tmp_path)), progress=False, input_size=16)
    assert protocol.images is None
    assert protocol.evaluate(RedAngle(), torch.device("cpu"), batch_size=3)["rank"] == {"1": 0.2, "5": 0.6, "20": 0.8}


# ----------------------------------------------------------------------------------------------------
# QMUL-SurvFace protocol end to end
# ----------------------------------------------------------------------------------------------------

# verification: 4 positive pairs of red distances 0, 10, 30, 80; 10 negative pairs of distances 5, 20, 40, ...
SV_POSITIVE = [(20, 20), (20, 30), (100, 130), (150, 230)]
SV_NEGATIVE = [(20, 25), (30, 50), (100, 140), (100, 150), (150, 210), (150, 220), (30, 120), (20, 120), (130, 240),
               (100, 220)]
# identification: gallery (name, id, red); templates at red-equivalents id1 20 (mean of 10 and 30), id2 100,
# id3 180, id4 60, id5 26
SI_GALLERY = [("1_c1_1.png", 1, 10), ("1_c1_2.png", 1, 30), ("2_c1_1.png", 2, 100), ("3_c1_1.png", 3, 180),
              ("3_c2_1.png", 3, 180), ("4_c1_1.png", 4, 60), ("5_c1_1.png", 5, 26)]
SI_MATED = [
    ("1_c2_1.png", 1, 21),   # d 1 to its template, rank 1
    ("2_c2_1.png", 2, 75),   # d 25 (template 4 at d 15 is nearer), rank 2
    ("3_c3_1.png", 3, 170),  # d 10, rank 1
    ("4_c2_1.png", 4, 64),   # d 4, rank 1
    ("5_c2_1.png", 5, 22),   # d 4 (template 1 at d 2 is nearer), rank 2
]
# unmated probes' best distances to any template: 0 (equal to template 4's image), 5, 11, 20, 30, 35, 40, 50, 60, 70
SI_UNMATED = [60, 95, 111, 0, 130, 135, 140, 230, 240, 250]


def _write_survface_benchmark(root: Path) -> Path:
    reds = sorted({r for pair in SV_POSITIVE + SV_NEGATIVE for r in pair})
    names = {r: f"{r}_cam1_{r}.png" for r in reds}
    ref_survface_verification(root, {names[r]: solid(r, k) for k, r in enumerate(reds)},
                              [(names[a], names[b]) for a, b in SV_POSITIVE],
                              [(names[a], names[b]) for a, b in SV_NEGATIVE])
    ref_survface_identification(root, [(n, i, solid(r, k)) for k, (n, i, r) in enumerate(SI_GALLERY)],
                                [(n, i, solid(r, k + 1)) for k, (n, i, r) in enumerate(SI_MATED)],
                                [(f"distractors_{k:02d}.png", solid(r, k)) for k, r in enumerate(SI_UNMATED)])
    return root


def test_survface_protocol_metrics_as_hand_computed(tmp_path, monkeypatch):
    """Verification: the largest negative score is distance 5, so TAR at FAR 1e-3 and 1e-2 (nearest ROC point:
    FPR 0) = 1/4 (distance 0 only); FAR 0.1 admits the first negative (FPR 0.1): positives nearer than the
    second negative (20) = 2/4; FAR 0.3 admits three negatives: positives nearer than 50 = 3/4.
    Identification (10 unmated probes): the threshold at FPIR 0.01 and 0.1 is the best unmated score
    (distance 0: nothing above it), at 0.2 the 2nd (distance 5), at 0.3 the 3rd (distance 11). Rank-1 TPIR:
    rank-1 mates nearer than the threshold: 0, 0, {d1, d4} = 2/5, {d1, d4, d10} = 3/5; the paper's TPIR20
    also counts the rank-2 mates: 0, 0, 3/5 (+ d4 of id5), 4/5. Rank-1 = 3/5, rank-5 = 1.
    Catches rank-1 TPIR reported as TPIR20 (or the reverse), gallery images scored one by one instead of as
    identity templates (the id-1 probe at 21 would face images 10 and 30), unmated probes counted as mated,
    the wrong FAR points, and positives and negatives swapped."""
    _write_survface_benchmark(tmp_path / "QMUL-SurvFace")
    monkeypatch.setenv("FACEBENCH_SURVFACE", str(tmp_path / "QMUL-SurvFace"))
    protocol = build_protocol("survface", DataSettings(root=str(tmp_path)), progress=False, input_size=16)
    out = protocol.evaluate(RedAngle(), torch.device("cpu"), batch_size=5)
    assert out["tar_at_far"] == {"0.001": 0.25, "0.01": 0.25, "0.1": 0.5, "0.3": 0.75}
    assert out["tpir_at_fpir"] == {"0.01": 0.0, "0.1": 0.0, "0.2": 0.4, "0.3": 0.6}
    assert out["tpir20_at_fpir"] == {"0.01": 0.0, "0.1": 0.0, "0.2": 0.6, "0.3": 0.8}
    assert out["rank1"] == 0.6 and out["rank"] == {"1": 0.6, "5": 1.0, "10": 1.0, "20": 1.0}
    assert out["summary"] == {"TAR@FAR=0.001": 0.25, "TAR@FAR=0.01": 0.25, "TPIR20@FPIR=0.1": 0.0,
                              "TPIR@FPIR=0.1": 0.0, "rank-1": 0.6}
    assert out["counts"] == {"verification_images": 13, "positive_pairs": 4, "negative_pairs": 10,
                             "gallery_images": 7, "gallery_identities": 5, "mated_probes": 5, "unmated_probes": 10}
    conventions = out["conventions"]
    assert "TAR at FAR 0.001, 0.01, 0.1, 0.3" in conventions["verification"]
    assert "L2-normalised mean" in conventions["gallery"] and "TPIR20@FPIR" in conventions["identification"]
    assert "resized straight to 16x16" in conventions["resize"] and "upsampling" in conventions["resize"]
    # the same numbers from a features .npy in the protocol's row order
    np.save(tmp_path / "features.npy", _red_features(protocol.images))
    again = protocol.score_features(str(tmp_path / "features.npy"), flip="precomputed")
    assert {k: again[k] for k in ("tar_at_far", "tpir_at_fpir", "tpir20_at_fpir", "rank1")} == \
        {k: out[k] for k in ("tar_at_far", "tpir_at_fpir", "tpir20_at_fpir", "rank1")}


def test_at_rank_turns_the_rank_1_test_into_rank_k_and_keeps_the_threshold():
    """TPIR at rank k from :func:`at_rank` equals an independent numpy count: mate rank <= k and mate score
    above the max(floor(N x FPIR) - 1, 0)-th largest unmated best score."""
    rng = np.random.default_rng(3)
    summary = OpenSetScores(mate_score=rng.uniform(size=40), best_nonmate=rng.uniform(size=40),
                            mate_rank=rng.integers(1, 30, size=40), nonmated_best=rng.uniform(size=25))
    for k in (1, 5, 20):
        for fpir in (0.04, 0.1, 0.2, 0.3):
            threshold = np.sort(summary.nonmated_best)[::-1][max(int(np.floor(25 * fpir)) - 1, 0)]
            expected = np.mean((summary.mate_rank <= k) & (summary.mate_score > threshold))
            assert tpir_from_scores(at_rank(summary, k), [fpir])[fpir] == pytest.approx(expected)


def test_survface_missing_folder_names_the_variable_and_what_to_obtain(tmp_path, monkeypatch):
    monkeypatch.delenv("FACEBENCH_SURVFACE", raising=False)
    with pytest.raises(DataError) as info:
        check_available("survface", DataSettings(root=str(tmp_path)))
    message = str(info.value)
    assert message.startswith(f"survface: {tmp_path / 'eval' / 'QMUL-SurvFace'} (from the data root) is not a folder")
    assert "set FACEBENCH_SURVFACE=DIR" in message and "qmul-survface.github.io" in message and "\n" not in message


def test_gallery_templates_average_unit_features_per_identity():
    """Templates are the normalised mean of the *unit* image features, one per identity, ids sorted: a long
    feature does not outweigh a short one. Catches pooling of raw features and a lost id order."""
    from bench.eval.lowres_real import gallery_templates

    ids, templates = gallery_templates(np.array([[0.0, 1.0], [3.0, 0.0], [0.0, -2.0]]), np.array([7, 7, 2]))
    assert ids.tolist() == [2, 7]
    assert np.allclose(templates, [[0.0, -1.0], [np.sqrt(0.5), np.sqrt(0.5)]])


def test_names_stored_as_a_char_matrix_are_read_too(tmp_path):
    """A name list saved as a MATLAB char matrix (rows padded with blanks) instead of a cell reads the same."""
    probes, gallery, distractors = _tinyface_entries()
    root = ref_tinyface(tmp_path, probes, gallery, distractors)
    savemat(str(root / "Testing_Set" / "probe_img_ID_pairs.mat"),
            {"probe_set": np.array(["3_1.jpg", "7_2.jpg", "3_4.jpg"]), "probe_ids": np.array([[3], [7], [3]])})
    assert [p.name for p in read_tinyface(root).probe_paths] == ["3_1.jpg", "7_2.jpg", "3_4.jpg"]
