"""insightface ``.bin`` packs: the Python-2 byte layout, both entry kinds, the restricted unpickler (a
malicious pickle is refused with no effect), corrupt files, and the verification protocol end to end."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, locate_benchmark
from bench.eval.images import encode_png
from bench.eval.verification import dumps_bin, encode_bin_entries, load_bin, write_bin

PAIRS = 20  # 10 folds of 2 pairs, as eval_formats.md's fixture recipe


def _images(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def _colour_pairs(size: int = 16) -> tuple[np.ndarray, list[bool]]:
    """Pair k: two images of one colour when genuine, of two far-apart colours when not (fold of 1 + 1)."""
    rng = np.random.default_rng(3)
    images, issame = [], []
    for k in range(PAIRS):
        same = k % 2 == 0
        first = rng.integers(0, 256, size=3)
        second = first if same else 255 - first
        images += [np.broadcast_to(first, (size, size, 3)), np.broadcast_to(second, (size, size, 3))]
        issame.append(same)
    return np.stack(images).astype(np.uint8), issame


def test_python2_layout_needs_bytes_encoding_and_round_trips(tmp_path):
    images = _images(2 * PAIRS)
    issame = [k % 2 == 0 for k in range(PAIRS)]
    data = dumps_bin(encode_bin_entries(images, "png"), issame)
    assert data[:2] == b"\x80\x02" and data[2:3] == b"]" and data.endswith(b"\x86q" + bytes([2 * PAIRS + 2]) + b".")
    with pytest.raises(UnicodeDecodeError):  # what py3 users of py2 packs hit (insightface issues #70, #149)
        pickle.loads(data)
    bins, flags = pickle.loads(data, encoding="bytes")
    assert isinstance(bins[0], bytes) and flags == issame
    path = tmp_path / "lfw.bin"
    path.write_bytes(data)
    loaded, loaded_issame = load_bin(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (2 * PAIRS, 16, 16, 3)
    assert np.array_equal(loaded, images) and loaded_issame.tolist() == issame


@pytest.mark.parametrize("variant", ["py2-ndarray", "py3-protocol2-bytes", "py3-protocol2-ndarray",
                                     "py3-protocol5-ndarray", "py2-jpeg-bytes"])
def test_every_entry_kind_loads(tmp_path, variant):
    images = _images(2 * PAIRS, seed=1)
    issame = [k % 3 == 0 for k in range(PAIRS)]
    if variant == "py2-ndarray":      # cfp2pack / agedb2pack: cv2.imencode arrays pickled by Python 2
        data = dumps_bin(encode_bin_entries(images, "png", as_arrays=True), issame)
    elif variant == "py2-jpeg-bytes":
        data = dumps_bin(encode_bin_entries(images, "jpeg", quality=95), issame)
    else:
        protocol = 5 if "protocol5" in variant else 2
        entries = encode_bin_entries(images, "png", as_arrays="ndarray" in variant)
        data = pickle.dumps((entries, issame), protocol=protocol)
    path = tmp_path / "pack.bin"
    path.write_bytes(data)
    loaded, loaded_issame = load_bin(path)
    assert loaded_issame.tolist() == issame
    if "jpeg" in variant:
        assert np.abs(loaded.astype(int) - images.astype(int)).mean() < 60  # lossy, but these images
    else:
        assert np.array_equal(loaded, images)


def test_malicious_bin_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    for payload in (pickle.dumps(Exploit(), protocol=2),                       # the whole file
                    pickle.dumps(([Exploit()], [True]), protocol=2),            # hidden in the entries
                    b"\x80\x02cbuiltins\neval\nq\x00X\x0b\x00\x00\x00__import__()q\x01\x85q\x02Rq\x03."):
        path = tmp_path / "evil.bin"
        path.write_bytes(payload)
        with pytest.raises(DataError) as info:
            load_bin(path)
        message = str(info.value)
        assert message.startswith(f"{path}: refused to load") and "could run code" in message
        assert "\n" not in message
    assert not marker.exists()


def test_numpy_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.bin"
    path.write_bytes(pickle.dumps(([np.array([b"x"], dtype=object)] * 2, [True]), protocol=2))
    with pytest.raises(DataError, match=r"refused to load.*numpy.dtype\(.O"):
        load_bin(path)


@pytest.mark.parametrize("make, message", [
    (lambda good: good[:len(good) // 2], "not a readable .bin pickle"),
    (lambda good: b"hello world", "not a readable .bin pickle"),
    (lambda good: pickle.dumps({"a": 1}, protocol=2), "expected a pickled (bins, issame_list) pair"),
    (lambda good: dumps_bin([encode_png(torch.zeros(3, 4, 4, dtype=torch.uint8))] * 2, [True]).replace(
        b"\x88", b"K\x07"), "issame_list must hold only booleans"),
    (lambda good: pickle.dumps(([b"x"] * 3, [True]), protocol=2), "3 images for 1 pairs"),
    (lambda good: pickle.dumps(([b"not an image", b"x"], [True]), protocol=2), "(image 0): not a JPEG or PNG image"),
    (lambda good: pickle.dumps(([encode_png(torch.zeros(3, 4, 4, dtype=torch.uint8)),
                                 encode_png(torch.zeros(3, 5, 4, dtype=torch.uint8))], [True]), protocol=2),
     "image 1 is (5, 4), image 0 is (4, 4)"),
])
def test_corrupt_packs_are_one_line_errors_naming_the_file(tmp_path, make, message):
    good = dumps_bin(encode_bin_entries(_images(4), "png"), [True, False])
    path = tmp_path / "bad.bin"
    path.write_bytes(make(good))
    with pytest.raises(DataError) as info:
        load_bin(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


def test_missing_pack_says_where_it_looked_and_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("FACEBENCH_LFW", raising=False)
    with pytest.raises(DataError, match=r"lfw: .*eval/lfw.bin \(from the data root\) is not a file; set FACEBENCH_LFW"):
        PROTOCOLS.get("lfw")(DataSettings(root=str(tmp_path)), progress=False)
    pack = tmp_path / "elsewhere.bin"
    monkeypatch.setenv("FACEBENCH_LFW", str(pack))
    write_bin(pack, _images(2 * PAIRS, size=112), [True, False] * (PAIRS // 2))
    assert locate_benchmark("lfw", DataSettings(root=str(tmp_path)), "lfw.bin") == pack


def test_card_points_to_the_pack(tmp_path, monkeypatch):
    monkeypatch.delenv("FACEBENCH_CFP_FP", raising=False)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "cfp_fp.yaml").write_text("where: {env: MY_CFP, path: packs/cfp.bin}\n")
    write_bin(tmp_path / "packs" / "cfp.bin", _images(2 * PAIRS, size=112), [True] * PAIRS)
    assert locate_benchmark("cfp_fp", DataSettings(root=str(tmp_path)), "cfp_fp.bin") == tmp_path / "packs" / "cfp.bin"


class MeanColour(nn.Module):
    """A flip-invariant toy encoder: the mean of each channel (so same-colour images are identical)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + 2.0  # shift off the origin so every feature has a direction


def test_lfw_protocol_end_to_end_with_hand_checked_numbers(tmp_path):
    images, issame = _colour_pairs(size=112)
    write_bin(tmp_path / "eval" / "lfw.bin", images, issame, image_format="png")
    protocol = PROTOCOLS.get("lfw")(DataSettings(root=str(tmp_path)), progress=False,
                                    options=EvalSettings(protocols=["lfw"]))
    assert protocol.images.shape == (40, 3, 32, 32)  # 112 px pack resized to the 32 px SynthFace model
    out = protocol.evaluate(MeanColour(), torch.device("cpu"), batch_size=8)
    # genuine pairs are identical images (distance 0), impostors complementary colours (distance > 0.01):
    # every fold is perfect and the first best threshold on the grid is 0.01
    assert out["accuracy"] == 1.0 and out["accuracy_std"] == 0.0
    assert out["fold_thresholds"] == [0.01] * 10 and out["tar_at_far"]["0.001"] == 1.0
    assert out["num_pairs"] == PAIRS and out["num_genuine"] == PAIRS // 2
    conventions = out["conventions"]
    assert conventions["embedding"] == "normalise(f(x) + f(flip(x)))"
    assert "resized to 32x32" in conventions["images"]
    # the same numbers from precomputed features (bench eval --features)
    features = tmp_path / "features.npy"
    np.save(features, np.repeat(images.reshape(40, -1, 3).mean(axis=1) / 127.5 + 1.0, 2, axis=1))
    again = protocol.score_features(features, flip="precomputed")
    assert again["accuracy"] == 1.0 and again["conventions"]["embedding"].startswith("normalise(features supplied")
    np.save(features, np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"expected features \[40, D\]"):
        protocol.score_features(features)


def test_synth_lfw_goes_through_a_real_bin(tmp_path, tiny_eval):
    data = DataSettings(root=str(tmp_path))
    protocol = PROTOCOLS.get("synth-lfw")(data, progress=False)
    assert protocol.path.name == "synth-lfw.bin" and (protocol.path.parent / "COMPLETE.json").is_file()
    images, issame = load_bin(protocol.path)
    assert images.shape == (160, 32, 32, 3) and issame.shape == (80,)  # 10 folds x (4 + 4) pairs
    # the .bin holds exactly the rendered pixels (PNG entries)
    from bench.data.datasets import EVAL_NAMESPACE, synthface_config
    from bench.data.synthface import SynthFace
    from bench.eval.verification import lfw_style_pairs

    ids, samples, _ = lfw_style_pairs(40, seed=0, pairs_per_kind=4)
    rendered = SynthFace(synthface_config(data.synthface)).render(torch.as_tensor(ids[:4]),
                                                                  torch.as_tensor(samples[:4]), EVAL_NAMESPACE)
    assert np.array_equal(images[:4], rendered.images.permute(0, 2, 3, 1).numpy())
    second = PROTOCOLS.get("synth-lfw")(data, progress=False)  # cached: same file, not rewritten
    assert second.path == protocol.path and Path(second.path).stat().st_mtime == Path(protocol.path).stat().st_mtime
