"""insightface ``.bin`` packs: the Python-2 byte layout, both entry kinds, the restricted unpickler (a
malicious pickle is refused with no effect), corrupt files, and the verification protocol end to end.

Packs read by the library are written by the independent writers of ``tests/data_formats.py`` (py2
opcodes spelled differently from the library's writer); the library's writer is checked by reading its
bytes back with the standard library's unpickler.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_formats import jpeg, png, ref_bin, ref_bin_arrays, ref_read_bin
from PIL import Image
from torch import nn

from bench.config import DataSettings, EvalSettings
from bench.errors import DataError
from bench.eval import PROTOCOLS, locate_benchmark
from bench.eval.formats.bin import dumps_bin, encode_bin_entries, load_bin, write_bin

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


def _pngs(images: np.ndarray) -> list[bytes]:
    return [png(image) for image in images]


def _write_pack(path: Path, images: np.ndarray, issame: list[bool]) -> Path:
    """A PNG-entry ``.bin`` written by the independent writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ref_bin(_pngs(images), issame))
    return path


def test_python2_layout_needs_bytes_encoding_and_round_trips(tmp_path):
    """The library's writer (used for synth-lfw) makes py2 protocol-2 bytes that the standard unpickler
    reads back exactly. Catches a writer that drifts from py2's opcodes or loses entries or flags."""
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
    write_bin(tmp_path / "written.bin", images, issame, image_format="png", as_arrays=True)
    entries, flags = ref_read_bin((tmp_path / "written.bin").read_bytes())
    assert flags == issame and len(entries) == 2 * PAIRS
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(e))), image) for e, image in zip(entries, images))


@pytest.mark.parametrize("variant", ["py2-ndarray", "py3-protocol2-bytes", "py3-protocol2-ndarray",
                                     "py3-protocol5-ndarray", "py2-jpeg-bytes"])
def test_every_entry_kind_loads(tmp_path, variant):
    """Every way a pack's entries occur (py2 str, py2 numpy arrays, py3 re-pickles) loads to the same pixels.
    Catches a loader that handles only the library's own spelling."""
    images = _images(2 * PAIRS, seed=1)
    issame = [k % 3 == 0 for k in range(PAIRS)]
    if variant == "py2-ndarray":      # cfp2pack / agedb2pack: cv2.imencode arrays pickled by Python 2
        data = ref_bin_arrays(_pngs(images), issame)
    elif variant == "py2-jpeg-bytes":
        data = ref_bin([jpeg(image) for image in images], issame)
    else:
        protocol = 5 if "protocol5" in variant else 2
        entries = [np.frombuffer(e, np.uint8) if "ndarray" in variant else e for e in _pngs(images)]
        data = pickle.dumps((entries, issame), protocol=protocol)
    path = tmp_path / "pack.bin"
    path.write_bytes(data)
    loaded, loaded_issame = load_bin(path)
    assert loaded_issame.tolist() == issame
    if "jpeg" in variant:
        assert np.abs(loaded.astype(int) - images.astype(int)).mean() < 60  # lossy, but these images
    else:
        assert np.array_equal(loaded, images)


# Malicious and corrupt packs (a pickle naming a callable, numpy object arrays, truncated or malformed packs)
# are in tests/faults/test_faults_inputs.py, through `bench eval`.


def test_missing_pack_says_where_it_looked_and_what_to_set(tmp_path, monkeypatch):
    """A missing pack names where it was looked for and the variable to set; ``$FACEBENCH_LFW`` is honoured.
    Catches a lookup that ignores the variable or an error that hides the path."""
    monkeypatch.delenv("FACEBENCH_LFW", raising=False)
    with pytest.raises(DataError, match=r"lfw: .*eval/lfw.bin \(from the data root\) is not a file; set FACEBENCH_LFW"):
        PROTOCOLS.get("lfw")(DataSettings(root=str(tmp_path)), progress=False)
    pack = tmp_path / "elsewhere.bin"
    monkeypatch.setenv("FACEBENCH_LFW", str(pack))
    _write_pack(pack, _images(2 * PAIRS, size=112), [True, False] * (PAIRS // 2))
    assert locate_benchmark("lfw", DataSettings(root=str(tmp_path)), "lfw.bin") == pack


def test_card_points_to_the_pack(tmp_path, monkeypatch):
    """An ``eval/<name>.yaml`` card's ``path`` is used under the data root. Catches a card that is ignored."""
    monkeypatch.delenv("FACEBENCH_CFP_FP", raising=False)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "cfp_fp.yaml").write_text("where: {env: MY_CFP, path: packs/cfp.bin}\n")
    _write_pack(tmp_path / "packs" / "cfp.bin", _images(2 * PAIRS, size=112), [True] * PAIRS)
    assert locate_benchmark("cfp_fp", DataSettings(root=str(tmp_path)), "cfp_fp.bin") == tmp_path / "packs" / "cfp.bin"


class MeanColour(nn.Module):
    """A flip-invariant toy encoder: the mean of each channel (so same-colour images are identical)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + 2.0  # shift off the origin so every feature has a direction


def test_lfw_protocol_end_to_end_with_hand_checked_numbers(tmp_path):
    """A 112 px pack (independent writer) scored end to end with hand-checked accuracy, thresholds and TAR,
    then again from precomputed features. Catches wrong pair order, fold split, threshold grid or read-off,
    a resize that is not recorded, and a --features path that disagrees with the image path."""
    images, issame = _colour_pairs(size=112)
    _write_pack(tmp_path / "eval" / "lfw.bin", images, issame)
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


def test_input_size_comes_from_the_caller_else_the_dataset(tmp_path):
    """The size a pack is resized to: the caller's ``input_size`` (bench run: the training images'), else
    SynthFace's image size, else the card's image size for a real dataset. Catches the old fixed 112 px for
    real data and an ``input_size`` that is ignored."""
    from bench.eval import build_protocol

    images, issame = _colour_pairs(size=112)
    _write_pack(tmp_path / "eval" / "lfw.bin", images, issame)
    (tmp_path / "card.yaml").write_text("name: tiny\ntitle: t\nformat: recordio\nwhere: {env: FACEBENCH_TINY_TEST, "
                                        "path: tiny}\nidentities: 1\nimages: 1\nimage_size: [24, 24]\nobtain: n/a\n")
    real = DataSettings(root=str(tmp_path), dataset="custom", card=str(tmp_path / "card.yaml"))
    assert PROTOCOLS.get("lfw")(real, progress=False).images.shape[-2:] == (24, 24)
    assert build_protocol("lfw", real, progress=False, input_size=40).images.shape[-2:] == (40, 40)
    synth = DataSettings(root=str(tmp_path))
    assert build_protocol("lfw", synth, progress=False).images.shape[-2:] == (32, 32)
    native = build_protocol("lfw", synth, progress=False, input_size=112)
    out = native.evaluate(MeanColour(), torch.device("cpu"), batch_size=8)
    assert native.images.shape[-2:] == (112, 112) and out["conventions"]["images"] == "112x112 from lfw.bin"


def test_synth_lfw_goes_through_a_real_bin(tmp_path, tiny_eval):
    data = DataSettings(root=str(tmp_path))
    protocol = PROTOCOLS.get("synth-lfw")(data, progress=False)
    assert protocol.path.name == "synth-lfw.bin" and (protocol.path.parent / "COMPLETE.json").is_file()
    images, issame = load_bin(protocol.path)
    assert images.shape == (160, 32, 32, 3) and issame.shape == (80,)  # 10 folds x (4 + 4) pairs
    # the .bin holds exactly the rendered pixels (PNG entries)
    from bench.data.synth_trainset import EVAL_NAMESPACE, synthface_config
    from bench.data.synthface import SynthFace
    from bench.eval.synth_benchmarks import lfw_style_pairs

    ids, samples, _ = lfw_style_pairs(40, seed=0, pairs_per_kind=4)
    rendered = SynthFace(synthface_config(data.synthface)).render(torch.as_tensor(ids[:4]),
                                                                  torch.as_tensor(samples[:4]), EVAL_NAMESPACE)
    assert np.array_equal(images[:4], rendered.images.permute(0, 2, 3, 1).numpy())
    second = PROTOCOLS.get("synth-lfw")(data, progress=False)  # cached: same file, not rewritten
    assert second.path == protocol.path and Path(second.path).stat().st_mtime == Path(protocol.path).stat().st_mtime
