"""IJB-B/C: template pooling with multi-frame media (hand-computed), pair scoring against a plain reference,
Umeyama alignment, the file readers' errors, and the protocol end to end on a folder written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS
from bench.eval.align import ARCFACE_TEMPLATE_112, align_faces, umeyama
from bench.eval.formats.ijb_meta import read_ijb
from bench.eval.formats.images import encode_jpeg
from bench.eval.ijb import score_pairs, template_features

# ----------------------------------------------------------------------------------------------------
# pooling and scoring
# ----------------------------------------------------------------------------------------------------

FEATURES = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
TEMPLATES = np.array([1, 1, 1, 2])
MEDIAS = np.array([10, 11, 11, 20])  # template 1: a still (media 10) and a two-frame video (media 11)
SCORES = np.array([1.0, 0.5, 1.0, 0.5])


def test_template_pooling_hand_computed():
    # insightface default: raw features x detector score -> [1,0], [1.5,0], [0,3], [0,1]
    # template 1: media 10 = [1, 0]; media 11 = mean([1.5, 0], [0, 3]) = [0.75, 1.5]; sum = [1.75, 1.5]
    ids, feats = template_features(FEATURES, TEMPLATES, MEDIAS, SCORES)
    assert ids.tolist() == [1, 2]
    norm = np.sqrt(1.75 ** 2 + 1.5 ** 2)
    assert np.allclose(feats, [[1.75 / norm, 1.5 / norm], [0.0, 1.0]], atol=1e-6)
    # normalised images, no detector score: [1,0], [1,0], [0,1] -> media 11 = [0.5, 0.5]; sum = [1.5, 0.5]
    _, normed = template_features(FEATURES, TEMPLATES, MEDIAS, normalize_images=True)
    assert np.allclose(normed[0], np.array([1.5, 0.5]) / np.sqrt(2.5), atol=1e-6)
    # without media pooling the video would count twice: a plain mean of the three images differs
    assert not np.allclose(normed[0], np.array([2.0, 1.0]) / np.sqrt(5.0), atol=1e-3)


def test_template_pooling_against_a_plain_loop():
    rng = np.random.default_rng(0)
    count = 500
    features = rng.normal(size=(count, 8)).astype(np.float32)
    templates = rng.integers(0, 40, size=count) * 7 + 3
    medias = rng.integers(0, 30, size=count)  # media ids shared across templates, as in IJB-C
    scores = rng.uniform(0.1, 1.0, size=count)
    ids, pooled = template_features(features, templates, medias, scores)
    for row, template in enumerate(ids):
        total = np.zeros(8)
        for media in np.unique(medias[templates == template]):
            members = (templates == template) & (medias == media)
            total += (features[members] * scores[members, None]).mean(axis=0)
        assert np.allclose(pooled[row], total / np.linalg.norm(total), atol=1e-5)


@pytest.mark.parametrize("ids_kind", ["compact", "sparse"])
def test_score_pairs_matches_plain_dot_products(ids_kind):
    rng = np.random.default_rng(1)
    num = 300
    ids = np.arange(num) * (1 if ids_kind == "compact" else 10**9) + 5
    feats = rng.normal(size=(num, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    for pairs in (50, 60_000):  # few pairs: direct dot products; many: blocked matrix products
        i1, i2 = rng.integers(0, num, size=pairs), rng.integers(0, num, size=pairs)
        got = score_pairs(ids, feats, ids[i1], ids[i2], block_rows=64)
        assert np.allclose(got, np.sum(feats[i1] * feats[i2], axis=1), atol=1e-5)
    with pytest.raises(ValueError, match="t2 references template 4"):
        score_pairs(ids, feats, ids[:2], np.array([ids[0], 4]))


def test_umeyama_recovers_a_similarity_and_aligns_landmarks_onto_the_template():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = (ARCFACE_TEMPLATE_112 - shift) @ np.linalg.inv(linear).T
    assert np.allclose(umeyama(source, ARCFACE_TEMPLATE_112), np.c_[linear, shift], atol=1e-9)
    # bright blobs at landmarks of a 160 x 150 loose crop end up on the template after alignment
    landmarks = ARCFACE_TEMPLATE_112 @ (1.2 * np.array([[0.98, -0.17], [0.17, 0.98]])).T + [20.0, 15.0]
    ys, xs = np.mgrid[0:150, 0:160]
    image = np.zeros((150, 160))
    for x, y in landmarks:
        image += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0 ** 2))
    loose = torch.from_numpy(np.clip(image * 255, 0, 255).astype(np.uint8))[None, None].expand(1, 3, 150, 160)
    aligned = align_faces(loose.contiguous(), landmarks[None])[0, 0].double().numpy()
    for x, y in ARCFACE_TEMPLATE_112:
        window = aligned[int(y) - 4:int(y) + 6, int(x) - 4:int(x) + 6]
        gy, gx = np.mgrid[int(y) - 4:int(y) + 6, int(x) - 4:int(x) + 6]
        assert abs((window * gx).sum() / window.sum() - x) < 0.5 and abs((window * gy).sum() / window.sum() - y) < 0.5


# ----------------------------------------------------------------------------------------------------
# a hand-written IJB-C folder
# ----------------------------------------------------------------------------------------------------

COLOURS = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 4: (200, 200, 30)}
# (name, template, media, subject whose colour the image shows, detector score)
IMAGES = [
    ("1.jpg", 1, 1, 1, 0.9), ("2.jpg", 1, 2, 1, 0.8), ("3.jpg", 1, 2, 1, 0.7),       # still + 2-frame video
    ("4.jpg", 2, 3, 1, 0.95),
    ("5.jpg", 3, 4, 2, 0.9),
    ("6.jpg", 4, 5, 2, 0.6), ("7.jpg", 4, 5, 2, 0.6), ("8.jpg", 4, 5, 2, 0.6),      # 3-frame video
    ("9.jpg", 5, 6, 3, 0.9),
    ("10.jpg", 6, 7, 3, 0.9), ("11.jpg", 6, 8, 1, 0.2),                              # a wrong face, low score
    ("12.jpg", 7, 9, 1, 0.9), ("13.jpg", 8, 10, 2, 0.9),                              # gallery G1
    ("14.jpg", 9, 11, 3, 0.9), ("15.jpg", 10, 12, 4, 0.9),                            # gallery G2
]
TEMPLATE_SUBJECT = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 1, 8: 2, 9: 3, 10: 4}
SHIFT = np.array([15.0, 10.0])  # landmarks = template + shift: the aligned window lies inside the crop


def write_ijbc(root: Path, pair_lines: list[str] | None = None) -> Path:
    folder = root / "IJBC"
    (folder / "loose_crop").mkdir(parents=True)
    (folder / "meta").mkdir()
    for name, _, _, subject, _ in IMAGES:
        image = torch.tensor(COLOURS[subject], dtype=torch.uint8)[:, None, None].expand(3, 140, 150)
        (folder / "loose_crop" / name).write_bytes(encode_jpeg(image.contiguous(), 95))
    points = " ".join(f"{v:.3f}" for v in (ARCFACE_TEMPLATE_112 + SHIFT).reshape(-1))
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{name} {points} {score}\n" for name, *_, score in IMAGES))
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m, *_ in IMAGES))
    if pair_lines is None:
        pair_lines = [f"{a} {b} {int(TEMPLATE_SUBJECT[a] == TEMPLATE_SUBJECT[b])}"
                      for a in range(1, 7) for b in range(a + 1, 7)]
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pair_lines) + "\n")
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n"
    for csv, templates in [("G1", (7, 8)), ("G2", (9, 10)), ("probe_mixed", (1, 2, 3, 4, 5, 6))]:
        name = f"ijbc_1N_gallery_{csv}.csv" if csv != "probe_mixed" else "ijbc_1N_probe_mixed.csv"
        rows = [f"{t},{TEMPLATE_SUBJECT[t]},{n},{m}\n" for n, t, m, *_ in IMAGES if t in templates]
        (folder / "meta" / name).write_text(header + "".join(rows))
    return folder


class MeanColour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + 2.0


def _expected_image_features() -> np.ndarray:
    """What the pipeline must produce: flip-added mean colour of each (uniform) crop."""
    colours = np.array([COLOURS[subject] for _, _, _, subject, _ in IMAGES], dtype=np.float64)
    return 2 * (colours / 127.5 - 1.0 + 2.0)


def test_ijbc_protocol_end_to_end(tmp_path):
    """A hand-written IJB-C folder through decode, alignment, pooling, 1:1 and 1:N, and the same numbers
    from the expected per-image features. Catches broken alignment or resizing, wrong media pooling, and
    1:N mates counted in the wrong gallery."""
    write_ijbc(tmp_path / "eval")
    data = DataSettings(root=str(tmp_path))
    protocol = PROTOCOLS.get("ijbc")(data, progress=False)
    out = protocol.evaluate(MeanColour(), torch.device("cpu"), batch_size=4)
    # template 6 (subject 3) holds a red face: it still matches template 5 better than any impostor
    assert out["1:1"]["num_pairs"] == 15 and out["1:1"]["num_genuine"] == 3 and out["1:1"]["num_impostor"] == 12
    assert out["1:1"]["tar_at_far"]["0.1"] == 1.0
    g1, g2 = out["1:N"]["G1"], out["1:N"]["G2"]
    assert (g1["num_mated"], g1["num_nonmated"], g2["num_mated"], g2["num_nonmated"]) == (4, 2, 2, 4)
    assert g1["rank"]["1"] == 1.0 and g2["rank"]["1"] == 1.0 and out["1:N"]["mean"]["rank"]["1"] == 1.0
    assert out["summary"] == {"TAR@FAR=1e-4": out["tar_at_far"]["0.0001"],
                              "TAR@FAR=1e-5": out["tar_at_far"]["1e-05"], "rank-1": 1.0}
    assert out["conventions"]["mode"].startswith("N1D1F2")
    assert out["num_images"] == 15 and out["num_templates"] == 10
    # the images went through decode + Umeyama alignment + resize unchanged: same numbers from the
    # expected per-image features, and the same template scores as a plain reference
    reference = protocol.score_features(_expected_image_features())
    assert reference["1:1"] == out["1:1"] and reference["1:N"] == out["1:N"]


def test_detector_score_option_weights_images_as_hand_computed(tmp_path):
    """``eval.ijb_detector_score`` changes the pooled templates exactly as the formula says.

    Catches: the option being ignored (scores always or never applied), or applied after pooling. Features
    are one-hot per subject, except the wrong face of template 6 (image 11, detector score 0.2), which is
    3 x subject 1's. By hand, template 5 = e3 and template 1 = e1; template 6 is
    with scores: 0.9 e3 + 0.2 * 3 e1 = (0.6, 0, 0.9): cos with e3 = 0.9 / 1.082 = 0.83 > cos with e1 = 0.55;
    without: e3 + 3 e1: cos with e3 = 1 / sqrt(10) = 0.32 < cos with e1 = 3 / sqrt(10) = 0.95.
    So of the pairs (5, 6) genuine and (1, 6) impostor, the genuine one wins only with scores: TAR is 1
    at every FAR with them, and 0 at every FAR without (the single impostor is accepted first).
    """
    write_ijbc(tmp_path / "eval", pair_lines=["5 6 1", "1 6 0"])
    features = np.zeros((len(IMAGES), 4))
    for row, (_, _, _, subject, _) in enumerate(IMAGES):
        features[row, subject - 1] = 1.0
    features[10] = [3.0, 0.0, 0.0, 0.0]  # image 11.jpg
    data = DataSettings(root=str(tmp_path))
    results = {}
    for with_scores in (True, False):
        options = EvalSettings(ijb_detector_score=with_scores)
        results[with_scores] = PROTOCOLS.get("ijbc")(data, progress=False, options=options).score_features(features)
    assert set(results[True]["1:1"]["tar_at_far"].values()) == {1.0}
    assert set(results[False]["1:1"]["tar_at_far"].values()) == {0.0}
    assert results[True]["conventions"]["mode"].startswith("N1D1F2")
    assert results[False]["conventions"]["mode"].startswith("N1D0F2")
    assert results[False]["conventions"]["image_feature"] == "f(x) + f(flip(x))"


def test_ijb_pairs_with_tied_scores(tmp_path):
    # both genuine pairs, (1, 2) red-red and (3, 4) green-green, score exactly 1.0: a tie at the top of the
    # ROC, which yields one point (FPR 0, TPR 1), so TAR is 1 at every FAR
    write_ijbc(tmp_path / "eval", pair_lines=["1 2 1", "3 4 1", "1 3 0", "2 4 0", "1 4 0"])
    out = PROTOCOLS.get("ijbc")(DataSettings(root=str(tmp_path)), progress=False).score_features(
        _expected_image_features())
    assert out["1:1"]["tar_at_far"]["1e-06"] == 1.0 and out["1:1"]["num_pairs"] == 5


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("edit, message", [
    (lambda m: (m / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n"), "line 1: expected 3 fields"),
    (lambda m: _edit(m / "ijbc_face_tid_mid.txt", "4.jpg 2 3", "4.jpg two 3"), "template ids must be integers"),
    (lambda m: _edit(m / "ijbc_name_5pts_score.txt", "2.jpg", "99.jpg"), "line 2 does not name the same image"),
    (lambda m: (m / "ijbc_template_pair_label.txt").write_text("1 77 0\n"), "template 77 has no image"),
    (lambda m: (m / "ijbc_template_pair_label.txt").write_text("1 2 5\n"), "pair labels must be 0 or 1"),
    (lambda m: (m / "ijbc_1N_gallery_G1.csv").write_text("7,1,12.jpg,9\n"), "must name TEMPLATE_ID and SUBJECT_ID"),
    (lambda m: (m / "ijbc_1N_probe_mixed.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n55,1\n"),
     "template 55 has no image"),
])
def test_bad_ijb_files_are_one_line_errors(tmp_path, edit, message):
    """Malformed meta files are one-line errors naming the file (missing files and crops are in
    tests/faults/test_faults_inputs.py). Catches a reader that accepts a bad line or loses the path."""
    folder = write_ijbc(tmp_path)
    edit(folder / "meta")
    with pytest.raises(DataError) as info:
        read_ijb(folder, "ijbc")
    assert message in str(info.value) and str(folder / "meta") in str(info.value) and "\n" not in str(info.value)


ONE_N_FILES = ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv")


def _bench_eval_ijbc(tmp_path, monkeypatch):
    """``bench eval --protocol ijbc --features`` on the folder under ``tmp_path/eval/IJBC``."""
    from typer.testing import CliRunner

    from bench.cli import app

    monkeypatch.setenv("FACEBENCH_IJBC", str(tmp_path / "eval" / "IJBC"))
    np.save(tmp_path / "features.npy", _expected_image_features())
    return CliRunner().invoke(app, ["eval", "--protocol", "ijbc", "--features", str(tmp_path / "features.npy"),
                                    "--no-progress", "--data-root", str(tmp_path)])


def test_a_wholly_absent_1n_protocol_is_skipped_with_a_warning_naming_the_paths(tmp_path, monkeypatch):
    """Issue 13: none of the 1:N files (the original IJB meta). Catches a silent skip and a warning that
    does not say exactly what was looked for: 1:1 is evaluated, stderr has one warning with every path."""
    folder = write_ijbc(tmp_path / "eval")
    for name in ONE_N_FILES:
        (folder / "meta" / name).unlink()
    result = _bench_eval_ijbc(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    paths = ", ".join(str(folder / "meta" / name) for name in ONE_N_FILES)
    assert warnings == [f"warning: ijbc: 1:N skipped (1:1 only): none of its files exists; looked for {paths}"]
    out = json.loads(result.stdout)["ijbc"]
    assert out["1:N"] == f"skipped: none of {paths} exists" and "rank-1" not in out["summary"]
    assert out["1:1"]["num_pairs"] == 15


def test_synth_ijbc_folder_is_real_format(tmp_path, tiny_eval):
    protocol = PROTOCOLS.get("synth-ijbc")(DataSettings(root=str(tmp_path)), progress=False)
    meta = protocol.meta
    assert meta.num_images > 8 * 3 and meta.galleries is not None and set(meta.galleries) == {"G1", "G2"}
    crop = protocol.meta.root / "loose_crop" / meta.names[0]
    from bench.eval.formats.images import read_image

    assert read_image(crop).shape == (3, 144, 144)  # loose crops bigger than the 112 alignment
    assert np.all((meta.detector_scores > 0) & (meta.detector_scores < 1))
    assert int(meta.pair_labels.sum()) == 8 and meta.t1.shape[0] == 16 * 15 // 2  # all pairs of 16 1:1 templates
    # video frames exist: some (template, media) hold more than one image
    _, counts = np.unique(np.stack([meta.templates, meta.medias], 1), axis=0, return_counts=True)
    assert counts.max() >= 2
    assert protocol.images.shape == (meta.num_images, 3, 32, 32)
