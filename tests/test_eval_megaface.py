"""MegaFace: devkit feature files and lists, the hit rule on hand-placed features (a tie included),
streaming invariance, the verification read-off, raw vs refined, and the protocol end to end.

Feature files and JSON lists read by the library are written by the independent writers of
``tests/data_formats.py``; the library's writers are checked by reading their files back with those readers.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from data_formats import ref_feature_bytes, ref_json_list, ref_read_feature
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS
from bench.eval.formats.images import encode_jpeg, encode_png
from bench.eval.formats.megaface_files import (
    read_feature_file,
    read_json_list,
    read_noise_list,
    write_feature_file,
    write_json_list,
)
from bench.eval.megaface import rank_accuracy, refined_probes, tar_at_far_top_impostors
from bench.eval.metrics import tar_at_far


def _at(degrees: float) -> list[float]:
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


# identity A: 0 and 30 degrees; B: twice 90 degrees; C: twice the exact vector of distractor 3
PROBES = np.array([_at(0), _at(30), _at(90), _at(90), [-1.0, 0.0], [-1.0, 0.0]])
LABELS = ["A", "A", "B", "B", "C", "C"]
DISTRACTORS = np.array([_at(10), _at(50), [-1.0, 0.0]])


def test_hit_rule_hand_computed():
    # A: (gallery a1, probe a2): s = cos 30 = 0.866; a2's distractor scores cos 20, cos 20, -0.866 -> rank 3.
    #    (gallery a2, probe a1): s = 0.866; a1's scores cos 10 = 0.985, cos 50 = 0.643, -1 -> rank 2.
    # B: identical images, s = 1 above every distractor -> rank 1 both ways.
    # C: s = 1 ties distractor 3 (s = 1): the rule's >= counts it found at rank 1, both ways.
    out = rank_accuracy(PROBES, LABELS, DISTRACTORS, ranks=(1, 2, 3))
    assert out == {1: 4 / 6, 2: 5 / 6, 3: 1.0}
    # streaming in chunks of one distractor changes nothing; scale does not matter (features normalised)
    assert rank_accuracy(3 * PROBES, LABELS, DISTRACTORS, ranks=(1, 2, 3), chunk=1) == out
    # with fewer distractors than the rank, every pair is found
    assert rank_accuracy(PROBES, LABELS, DISTRACTORS[:1], ranks=(2,)) == {2: 1.0}


def test_rank_accuracy_validation():
    with pytest.raises(ValueError, match="two probe images"):
        rank_accuracy(PROBES[:1], LABELS[:1], DISTRACTORS)
    with pytest.raises(ValueError, match="distractor features must be"):
        rank_accuracy(PROBES, LABELS, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        rank_accuracy(PROBES, LABELS, np.full((3, 2), np.nan))


def test_top_impostor_read_off_equals_the_full_roc_at_most_rule():
    rng = np.random.default_rng(0)
    genuine = rng.normal(0.6, 0.2, size=300)
    impostors = rng.normal(0.0, 0.2, size=20000)
    scores = np.concatenate([genuine, impostors])
    labels = np.r_[np.ones(300), np.zeros(20000)]
    fars = (1e-4, 1e-3, 1e-2)
    kept = np.sort(impostors)[::-1][:int(max(fars) * 20000) + 1]
    assert tar_at_far_top_impostors(genuine, kept, 20000, fars) == tar_at_far(scores, labels, fars, mode="at_most")


def test_feature_files_round_trip_and_errors(tmp_path):
    """Devkit Mat files: the library reads the independent writer's bytes, its own writer's bytes read back
    with the independent reader, and every malformed header is a one-line error. Catches a wrong header
    field order or type code, a dropped value, and a reader that accepts garbage."""
    vector = np.arange(512, dtype=np.float32) / 7
    reference = tmp_path / "r" / "x.jpg_r100.bin"
    reference.parent.mkdir()
    reference.write_bytes(ref_feature_bytes(vector))
    assert np.array_equal(read_feature_file(reference), vector)
    path = tmp_path / "a" / "x.jpg_r100.bin"
    write_feature_file(path, vector)
    assert path.stat().st_size == 2064  # 16-byte header + 512 float32, as insightface writes them
    assert struct.unpack("<4i", path.read_bytes()[:16]) == (512, 1, 4, 5)
    assert np.array_equal(ref_read_feature(path), vector) and path.read_bytes() == reference.read_bytes()
    doubles = tmp_path / "d.bin"
    doubles.write_bytes(struct.pack("<4i", 1, 3, 24, 6) + np.array([1.0, 2.0, 3.0]).tobytes())
    assert read_feature_file(doubles).tolist() == [1.0, 2.0, 3.0]
    for data, message in [(b"\x00" * 8, "shorter than the 16-byte"),
                          (struct.pack("<4i", 2, 1, 4, 7) + b"\x00" * 8, "feature type 7"),
                          (struct.pack("<4i", 4, 1, 4, 5) + b"\x00" * 8, "header announces 32"),
                          (struct.pack("<4i", 1, 1, 4, 5) + np.float32(np.nan).tobytes(), "NaN")]:
        doubles.write_bytes(data)
        with pytest.raises(DataError, match=message):
            read_feature_file(doubles)


def test_lists(tmp_path):
    """JSON template lists and noise lists: the library reads the independent writer's list and its own
    writer's list is the devkit's ``{"path", "id"}`` object. Catches swapped or dropped keys and ids that
    lose their order."""
    ref_json_list(tmp_path / "p.json", ["A/A_1.png", "B/B_1.png"], ["A", "B"])
    assert read_json_list(tmp_path / "p.json", with_ids=True) == (["A/A_1.png", "B/B_1.png"], ["A", "B"])
    write_json_list(tmp_path / "w.json", ["A/A_1.png", "B/B_1.png"], ["A", "B"])
    assert json.loads((tmp_path / "w.json").read_text()) == {"path": ["A/A_1.png", "B/B_1.png"], "id": ["A", "B"]}
    (tmp_path / "bad.json").write_text(json.dumps({"path": ["x"], "id": []}))
    with pytest.raises(DataError, match="'id' list as long as 'path'"):
        read_json_list(tmp_path / "bad.json", with_ids=True)
    (tmp_path / "n.txt").write_text("#Please strictly follow the rules\nA_1.png\n\n3\t375/3753@N00/41_0.jpg\n")
    assert read_noise_list(tmp_path / "n.txt") == ["A_1.png", "375/3753@N00/41_0.jpg"]


def test_refined_probe_is_its_identity_centre():
    probes = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [5.0, 5.0]])
    labels = ["A", "A", "A", "B"]
    noisy = np.array([False, False, True, False])
    out = refined_probes(probes, labels, noisy)
    assert np.allclose(out[2], np.array([1.0, 1.0]) / np.sqrt(2), atol=2e-3)  # centre of [1,0] and [0,1]
    assert np.allclose(out[[0, 1, 3]], [[1, 0], [0, 1], [np.sqrt(0.5)] * 2])


# ----------------------------------------------------------------------------------------------------
# a hand-written devkit folder: colour-coded people
# ----------------------------------------------------------------------------------------------------

PEOPLE = {"Ann": (220, 40, 40), "Bob": (40, 220, 40), "Cid": (40, 40, 220)}


class MeanColour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _solid(colour, size: int = 32) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, size, size).contiguous()


def write_megaface(root):
    """3 people x 2 probe images, one of Ann's is a mislabelled Bob; 20 grey-ish distractors, one is Cid."""
    folder = root / "eval" / "megaface"
    probe_paths, ids = [], []
    for person, colour in PEOPLE.items():
        for k in range(2):
            shown = PEOPLE["Bob"] if (person, k) == ("Ann", 1) else colour
            path = f"{person}/{person}_{k}.png"
            (folder / "facescrub_images" / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / "facescrub_images" / path).write_bytes(encode_png(_solid(shown)))
            probe_paths.append(path)
            ids.append(person)
    rng = np.random.default_rng(0)
    paths = []
    for n in range(20):
        colour = PEOPLE["Cid"] if n == 7 else tuple(int(v) for v in rng.integers(90, 160, size=3))
        path = f"{n % 3}/{n}@N00/{n}_0.jpg"
        (folder / "megaface_images" / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / "megaface_images" / path).write_bytes(encode_jpeg(_solid(colour), 95))
        paths.append(path)
    ref_json_list(folder / "templatelists" / "facescrub_features_list.json", probe_paths, ids)
    ref_json_list(folder / "templatelists" / "megaface_features_list.json_10_1", paths[:10])
    ref_json_list(folder / "templatelists" / "megaface_features_list.json_20_1", paths)
    (folder / "facescrub_noises.txt").write_text("#comment\nAnn_1.png\nZed_3.png\n")
    (folder / "megaface_noises.txt").write_text(f"#comment\n{paths[7]}\n")
    return folder


def test_megaface_protocol_raw_and_refined(tmp_path):
    """A hand-written devkit folder (lists by the independent writer): raw and refined rank-1 as reasoned
    in the comments, then the same numbers from devkit feature files written by the independent writer.
    Catches a wrong hit rule or tie rule, noise lists not applied, and a feature-file path that disagrees."""
    folder = write_megaface(tmp_path)
    protocol = PROTOCOLS.get("megaface")(DataSettings(root=str(tmp_path)), progress=False)
    out = protocol.evaluate(MeanColour(), torch.device("cpu"), batch_size=8)
    raw, refined = out["raw"]["identification"], out["refined"]["identification"]
    # raw: Ann's pair is a red and a green image (lost behind the grey distractors); Cid's pair is found at
    # 10 distractors but ties (>=, found) with the Cid-coloured distractor 7 at 20; Bob's pair is found.
    assert raw["10"]["rank"]["1"] == 4 / 6 and raw["20"]["rank"]["1"] == 4 / 6
    # refined: Ann_1 becomes Ann's centre (= Ann_0's direction) and distractor 7 is removed
    assert refined["10"]["rank"]["1"] == 1.0 and refined["20"]["rank"]["1"] == 1.0
    assert refined["20"]["num_distractors"] == 19 and out["refined"]["removed"] == {"probe_noise": 1,
                                                                                     "distractor_noise": 1}
    assert out["summary"] == {"rank-1 refined": 1.0} and out["sizes"] == [10, 20]
    assert out["raw"]["verification"]["num_impostor"] == 6 * 20 and out["raw"]["verification"]["num_genuine"] == 3
    assert "FaceX-Zoo" in out["conventions"]["identification"] and "raw" in out["conventions"]["variants"]
    # the same numbers from devkit feature files written the way gen_megaface.py writes them
    features = tmp_path / "features"
    probes = protocol.probe_images
    feats = (2 * MeanColour()(probes.float() / 127.5 - 1)).numpy()
    distractor_feats = (2 * MeanColour()(protocol.distractor_images.float() / 127.5 - 1)).numpy()
    for kind, paths, vectors in (("facescrub", protocol.set.probe_paths, feats),
                                 ("megaface", protocol.set.distractor_paths, distractor_feats)):
        for path, f in zip(paths, vectors):
            file = features / kind / (path + "_toy.bin")
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(ref_feature_bytes(f))
    again = protocol.score_features(features)
    for variant in ("raw", "refined"):
        assert again[variant]["identification"] == out[variant]["identification"]
    # raw only when asked (and no noise lists needed then)
    only_raw = PROTOCOLS.get("megaface")(DataSettings(root=str(tmp_path)), progress=False,
                                         options=EvalSettings(megaface_variants=["raw"]))
    assert set(only_raw.score_features(features)) >= {"raw"} and "refined" not in only_raw.score_features(features)
    (folder / "megaface_noises.txt").unlink()
    with pytest.raises(DataError, match="refined variant needs"):
        PROTOCOLS.get("megaface")(DataSettings(root=str(tmp_path)), progress=False)


def test_megaface_images_are_brought_to_the_model_input_size_and_the_record_says_so(tmp_path):
    """A model of input 16 gets the 32 px devkit images resized, and the conventions name both sizes; at the
    stored size they say nothing. Catches evaluation at a fixed size and a resize the record hides."""
    from bench.eval import build_protocol

    write_megaface(tmp_path)
    data = DataSettings(root=str(tmp_path))
    small = build_protocol("megaface", data, progress=False, input_size=16)
    assert small.probe_images.shape[1:] == (3, 16, 16) and small.distractor_images.shape[1:] == (3, 16, 16)
    out = small.evaluate(MeanColour(), torch.device("cpu"), batch_size=8)
    assert out["conventions"]["feature"] == ("normalise(f(x) + f(flip(x))); images stored at 32x32 resized to "
                                             "16x16 with antialiasing")
    same = build_protocol("megaface", data, progress=False, input_size=32).evaluate(MeanColour(), torch.device("cpu"),
                                                                                    batch_size=8)
    assert same["conventions"]["feature"] == "normalise(f(x) + f(flip(x)))"


def test_synth_megaface_folder_is_devkit_format(tmp_path, tiny_eval):
    """synth-megaface is a devkit folder read by the real readers, and its rank-1 (raw and refined, every
    size) equals plain loops over its images. Catches a wrong list size, missing noise lists, and any
    scoring error on the synthetic set that a 0..1 range check would let through."""
    protocol = PROTOCOLS.get("synth-megaface")(DataSettings(root=str(tmp_path)), progress=False)
    root = protocol.set.root
    assert protocol.set.sizes == [10, 40] and len(protocol.set.probe_paths) == 12
    assert (root / "templatelists" / "megaface_features_list.json_40_1").is_file()
    assert read_noise_list(root / "facescrub_noises.txt")  # listed, with decoys
    out = protocol.evaluate(MeanColour(), torch.device("cpu"), batch_size=64)
    assert set(out) >= {"raw", "refined", "summary", "conventions"}
    # rank-1 at every size against plain loops over the protocol's own images and lists
    probes = _mean_colour_features(protocol.probe_images)
    distractors = _mean_colour_features(protocol.distractor_images)
    refined = refined_probes(probes, protocol.set.probe_ids, protocol.set.probe_noise)
    for row, size in enumerate(protocol.set.sizes):
        members = protocol.set.membership[row]
        clean = members & ~protocol.set.distractor_noise
        assert out["raw"]["identification"][str(size)]["rank"]["1"] == _rank1_by_hand(
            probes, protocol.set.probe_ids, distractors[members])
        assert out["refined"]["identification"][str(size)]["rank"]["1"] == _rank1_by_hand(
            refined, protocol.set.probe_ids, distractors[clean])
    assert out["summary"]["rank-1 refined"] == out["refined"]["identification"]["40"]["rank"]["1"]


def _mean_colour_features(images: torch.Tensor) -> np.ndarray:
    """What :class:`MeanColour` gives through the flip test: twice the mean of ``x / 127.5 - 1`` (the mean
    colour is the same for a mirrored image)."""
    return 2 * (images.double().numpy() / 127.5 - 1.0).mean(axis=(2, 3))


def _rank1_by_hand(probes: np.ndarray, labels: list[str], distractors: np.ndarray) -> float:
    """The MegaFace rank-1 rule in plain loops: for each ordered pair (gallery i, probe j) of one identity,
    found when cos(j, i) >= cos(j, d) for every distractor d; the share of pairs found."""
    unit = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    others = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    found = pairs = 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j and labels[i] == labels[j]:
                pairs += 1
                found += all(unit[j] @ unit[i] >= unit[j] @ d for d in others)
    return found / pairs
