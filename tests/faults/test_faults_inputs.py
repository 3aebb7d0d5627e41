"""Faults in the input files (issues 12 and 13): malicious, corrupt, truncated, missing or mis-sized data.

README, "Data" and "Evaluation protocols": a bad input file is one line naming the file (and the record, key
or entry where there is one), exit 2, and nothing already written is lost. Every test here starts from a
results directory that holds an earlier record and a data root that holds caches (a split index, a labels
cache), gives one bad file to ``bench run`` (training data) or ``bench eval`` (benchmarks, with ``--out``
pointing at an earlier metrics file), and checks:

- exit code 2, exactly one ``error:`` line holding the case's fragments (the file's path first), no
  traceback, nothing on stdout;
- nothing written before is lost or changed (:func:`snapshot` / :func:`assert_preserved`): the earlier
  record, the data root's caches, the earlier metrics file and the bad input itself (never "repaired" or
  deleted), and no new record appeared in the results directory (:func:`tree`).

Breakage each group catches:

- RecordIO packs and indices (``bench run --dataset custom``): a corrupt ``.rec``/``.idx``/``property`` read
  with wrong labels, crashing with a traceback, or found only after a run record was opened;
- image folders: a broken first image or a malformed tree found late or without its path;
- sizes (issue 12): a pack whose images are not the size its ``property`` declares, or a size the backbone
  cannot take, found after training started (a 32 px pack used to crash in evaluation after its whole
  budget); both are now refused before any record exists;
- ``.bin`` packs and ``.npy`` features (``bench eval``): a pickle that runs code while loading (a marker
  file must not appear), and every malformed pack;
- meta files of IJB and MegaFace: a missing or partial meta file skipped silently (issue 13: a missing
  ``ijbc_1N_probe_mixed.csv`` dropped 1:N with exit 0) or reported without its path.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from bench.cli import app
from tests.data_formats import (MAGIC_LE, image_array, png, ref_bin, ref_pack, ref_write, write_im2rec,
                                write_insightface)
from tests.faults.fault_helpers import assert_one_error_line, assert_preserved, seed_earlier_record, snapshot, tree

runner = CliRunner()
#: Pool of the RecordIO faults: 8 images of 16 px, 3 identities (labels i % 3), written in key order.
POOL = 8


@dataclass
class Workspace:
    """An earlier record, a data root with caches, an earlier ``bench eval --out`` file, and the input data."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def data_root(self) -> Path:
        return self.root / "data-root"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def metrics_file(self) -> Path:
        return self.root / "earlier-metrics.json"

    def seed(self) -> None:
        seed_earlier_record(self.results, {"lfw": {"accuracy": 0.5}})
        for cache in ("splits/tiny/0123456789abcdef/full-0123456789ab.npy", "cache/fedcba9876543210/labels.npy"):
            (self.data_root / cache).parent.mkdir(parents=True, exist_ok=True)
            (self.data_root / cache).write_bytes(b"written by an earlier run")
        self.metrics_file.write_text(json.dumps({"lfw": {"accuracy": 0.75}}))
        self.inputs.mkdir()

    def state(self) -> tuple:
        return ({d: snapshot(d) for d in (self.results, self.data_root, self.inputs)}, tree(self.results),
                snapshot(self.metrics_file.parent))

    def assert_untouched(self, before: tuple) -> None:
        files, results_tree, top = before
        for directory, digests in files.items():
            assert_preserved(digests, directory)
        assert_preserved({k: v for k, v in top.items() if k == self.metrics_file.name}, self.root)
        assert tree(self.results) == results_tree, "the fault left a run record behind"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    space = Workspace(tmp_path)
    space.seed()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FACEBENCH_DATA_ROOT", raising=False)
    yield space


def assert_rejected(result: Result, *fragments: str) -> str:
    """Exit 2, one ``error:`` line holding every fragment, empty stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    line = assert_one_error_line(result.stderr, *fragments)
    assert result.stdout == "", result.stdout
    return line


def run_fault(space: Workspace, card: Path, *fragments: str, backbone: str = "small") -> str:
    """``bench run`` on the custom dataset of ``card`` (data in ``space.inputs``); asserts the rejection."""
    before = space.state()
    result = runner.invoke(app, [
        "run", "--methods", "arcface", "--dataset", "custom", "--backbone", backbone, "--eval", "synth-lfw",
        "--budget", "32", "--batch-size", "16", "--device", "cpu", "--no-progress", "--out", str(space.results),
        "--data-root", str(space.data_root), "--set", f"data.card={card}", "--set", f"data.path={space.inputs}",
        "--set", "data.workers=0"], prog_name="bench")
    line = assert_rejected(result, *fragments)
    space.assert_untouched(before)
    return line


def custom_card(space: Workspace, fmt: str = "recordio", layout: str = "im2rec", identities: int = 3,
                images: int = POOL, size: int = 16) -> Path:
    card = space.root / "card.yaml"
    card.write_text(f"name: tiny\ntitle: fault fixture\nformat: {fmt}\nlayout: {{{fmt}: {layout}}}\n"
                    f"where: {{env: FACEBENCH_FAULT_FIXTURE, path: tiny}}\nidentities: {identities}\n"
                    f"images: {images}\nimage_size: [{size}, {size}]\nobtain: written by the test.\n")
    return card


# ----------------------------------------------------------------------------------------------------
# RecordIO packs and indices (moved from test_recordio.py, now through bench run)
# ----------------------------------------------------------------------------------------------------


def _pack(directory: Path) -> list[int]:
    """An im2rec pack of :data:`POOL` images; returns the record offsets (key k at offsets[k])."""
    write_im2rec(directory, [png(image_array(i)) for i in range(POOL)], [i % 3 for i in range(POOL)],
                 list(range(POOL)))
    return [int(line.split("\t")[1]) for line in (directory / "train.idx").read_text().splitlines()]


def _patch_rec(directory: Path, offset: int, data: bytes) -> None:
    raw = bytearray((directory / "train.rec").read_bytes())
    raw[offset:offset + len(data)] = data
    (directory / "train.rec").write_bytes(bytes(raw))


def _idx_line(directory: Path, row: int, line: str) -> None:
    lines = (directory / "train.idx").read_text().splitlines()
    lines[row] = line
    (directory / "train.idx").write_text("\n".join(lines) + "\n")


def _bad_magic(d: Path, offsets: list[int]) -> tuple[str, ...]:
    _patch_rec(d, offsets[3], b"JUNK")
    return f"{d / 'train.rec'}: key 3 at offset {offsets[3]}", "bad magic"


def _truncated_record(d: Path, offsets: list[int]) -> tuple[str, ...]:
    last = POOL - 1  # cut inside the last record: its header is there, its bytes are not
    (d / "train.rec").write_bytes((d / "train.rec").read_bytes()[:offsets[last] + 30])
    return f"{d / 'train.rec'}: key {last} at offset {offsets[last]}", "truncated record"


def _idx_offset_past_the_end(d: Path, offsets: list[int]) -> tuple[str, ...]:
    size = (d / "train.rec").stat().st_size
    _idx_line(d, 2, f"2\t{size + 400}")
    return f"{d / 'train.idx'}: key 2 has offset {size + 400} past the end", str(d / "train.rec")


def _idx_offset_inside_a_record(d: Path, offsets: list[int]) -> tuple[str, ...]:
    _idx_line(d, 4, f"4\t{offsets[4] + 8}")
    return f"{d / 'train.rec'}: key 4 at offset {offsets[4] + 8}", "bad magic"


def _malformed_idx_line(d: Path, offsets: list[int]) -> tuple[str, ...]:
    _idx_line(d, 1, "1 x")
    return f"{d / 'train.idx'}: line 2 is not 'key<TAB>offset'",


def _duplicate_idx_key(d: Path, offsets: list[int]) -> tuple[str, ...]:
    _idx_line(d, 1, f"3\t{offsets[1]}")
    return f"{d / 'train.idx'}: key 3 appears more than once",


def _missing_property(d: Path, offsets: list[int]) -> tuple[str, ...]:
    (d / "property").unlink()
    return f"{d / 'property'}: missing property file",


def _missing_idx(d: Path, offsets: list[int]) -> tuple[str, ...]:
    (d / "train.idx").unlink()
    return f"{d / 'train.idx'}: file not found",


def _non_integer_label(d: Path, offsets: list[int]) -> tuple[str, ...]:
    ref_write(d, [(0, ref_pack(0.0, png(image_array(0)), 0)), (1, ref_pack(1.5, png(image_array(1)), 1))])
    return f"{d / 'train.rec'}: key 1 has label 1.5, not a non-negative integer",


def _more_labels_than_property(d: Path, offsets: list[int]) -> tuple[str, ...]:
    (d / "property").write_text("2,16,16\n")
    return f"{d / 'property'}: says 2 classes but {d / 'train.rec'} has label 2",


def _corrupt_label_count(d: Path, offsets: list[int]) -> tuple[str, ...]:
    _patch_rec(d, offsets[1] + 8, struct.pack("<I", 1_000_000))  # IRHeader flag: a million label values
    return f"{d / 'train.rec'}: key 1 at offset {offsets[1]}", "announces 1000000 label values"


def _header_disagrees_with_the_index(d: Path, offsets: list[int]) -> tuple[str, ...]:
    for name in ("train.rec", "train.idx", "property"):
        (d / name).unlink()
    write_insightface(d, [[png(image_array(0))], [png(image_array(1))]])
    lines = (d / "train.idx").read_text().splitlines()
    (d / "train.idx").write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # drop key 2
    return f"{d / 'train.rec'}: key 0 at offset", "header says 2 images and 2 identities"


def _split_record_cut_short(d: Path, offsets: list[int]) -> tuple[str, ...]:
    payload = ref_pack(0.0, b"ABCD" * 3 + MAGIC_LE + b"tail-bytes", 0)  # an aligned magic: two parts
    ref_write(d, [(0, payload)])
    (d / "train.rec").write_bytes((d / "train.rec").read_bytes()[:-12])
    return f"{d / 'train.rec'}: key 0 at offset 0", "truncated record"


RECORDIO_FAULTS: dict[str, Callable[[Path, list[int]], tuple[str, ...]]] = {
    "bad-magic": _bad_magic, "truncated-record": _truncated_record, "split-record-cut-short": _split_record_cut_short,
    "idx-offset-past-the-end": _idx_offset_past_the_end, "idx-offset-inside-a-record": _idx_offset_inside_a_record,
    "malformed-idx-line": _malformed_idx_line, "duplicate-idx-key": _duplicate_idx_key,
    "missing-property": _missing_property, "missing-idx": _missing_idx, "non-integer-label": _non_integer_label,
    "more-labels-than-property": _more_labels_than_property, "corrupt-label-count": _corrupt_label_count,
    "header-disagrees-with-the-index": _header_disagrees_with_the_index,
}


@pytest.mark.parametrize("fault", list(RECORDIO_FAULTS))
def test_faults_corrupt_recordio_pack_is_one_line_before_any_record(workspace, fault):
    """A corrupt RecordIO pack or index (``fault``) is refused in one line naming the file and the key or line,
    before a run record is opened; the pack, the caches and the earlier record are left as they were."""
    fragments = RECORDIO_FAULTS[fault](workspace.inputs, _pack(workspace.inputs))
    run_fault(workspace, custom_card(workspace), *fragments)


# ----------------------------------------------------------------------------------------------------
# image folders (moved from test_folder.py, now through bench run)
# ----------------------------------------------------------------------------------------------------


def _folder(root: Path, identities: dict[str, int]) -> None:
    for number, (identity, count) in enumerate(identities.items()):
        (root / identity).mkdir(parents=True)
        for i in range(count):
            (root / identity / f"{i:02d}.png").write_bytes(png(image_array(100 * number + i)))


@pytest.mark.parametrize("fault", ["broken-first-image", "mixed-tree-shapes", "no-images"])
def test_faults_corrupt_image_folder_is_one_line_naming_the_path(workspace, fault):
    """A broken image folder (``fault``): an undecodable first image (it gives the set's image size), a tree
    that mixes ``root/<identity>/<image>`` and ``root/<shard>/<identity>/<image>``, or identity folders with no
    image; one line naming the folder or file, nothing written."""
    data = workspace.inputs
    if fault == "broken-first-image":
        _folder(data, {"a": 2, "b": 1})
        (data / "a" / "00.png").write_bytes(b"\x89PNG broken")
        fragments = (f"{data / 'a' / '00.png'}: undecodable image",)
    elif fault == "mixed-tree-shapes":
        _folder(data, {"id": 1})
        _folder(data / "shard", {"inner": 1})
        fragments = (f"{data}: mixes root/<identity>/<image> (id) and root/<shard>/<identity>/<image> "
                     f"(shard/inner)",)
    else:
        (data / "x").mkdir()
        (data / "x" / "a.txt").write_text("")
        fragments = (f"{data}: no images found",)
    run_fault(workspace, custom_card(workspace, fmt="folder", layout="flat"), *fragments)


# ----------------------------------------------------------------------------------------------------
# sizes (issue 12): refused before training, not after the budget
# ----------------------------------------------------------------------------------------------------


def test_faults_pack_images_not_the_size_its_property_declares(workspace):
    """``property`` says 32 x 32, the records hold 16 px images: every decode would fail, at the first batch
    after the run record was opened. Now one line naming the record and the property file, and no record."""
    _pack(workspace.inputs)
    (workspace.inputs / "property").write_text("3,32,32\n")
    run_fault(workspace, custom_card(workspace, size=32), f"{workspace.inputs / 'train.rec'}: key 0 at offset 0: "
              f"image is 16x16, but this dataset's images are 32x32 (from {workspace.inputs / 'property'})")


def test_faults_image_size_the_backbone_cannot_take(workspace):
    """A 20 px pack with backbone ``small`` (input a multiple of 8): refused before any protocol is prepared
    or step trained, naming the backbone, the rule and where the size comes from; no record."""
    write_im2rec(workspace.inputs, [png(image_array(i, 20)) for i in range(POOL)], [i % 3 for i in range(POOL)],
                 list(range(POOL)), size=20)
    run_fault(workspace, custom_card(workspace, size=20),
              "error: backbone 'small': input_size must be a positive multiple of 8, got 20: the input size is the "
              "side of the training images of dataset 'custom' (20x20)")


# ----------------------------------------------------------------------------------------------------
# .bin packs and .npy features (moved from test_eval_bin.py, now through bench eval)
# ----------------------------------------------------------------------------------------------------


class _Exploit:
    """Pickles to ``os.system("touch MARKER")``: a loader that runs it leaves the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def eval_fault(space: Workspace, protocol: str, features: Path, *fragments: str) -> str:
    """``bench eval --protocol PROTOCOL --features FEATURES --out <earlier metrics>``; asserts the rejection."""
    before = space.state()
    result = runner.invoke(app, ["eval", "--protocol", protocol, "--features", str(features), "--no-progress",
                                 "--data-root", str(space.data_root), "--out", str(space.metrics_file)],
                           prog_name="bench")
    line = assert_rejected(result, *fragments)
    space.assert_untouched(before)
    return line


def _good_entries() -> list[bytes]:
    return [png(image_array(i)) for i in range(4)]


BIN_FAULTS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "malicious-whole-file": (lambda marker: pickle.dumps(_Exploit(marker), protocol=2),
                             "refused to load: the pickle asks for posix.system"),
    "malicious-entry": (lambda marker: pickle.dumps(([_Exploit(marker)], [True]), protocol=2), "refused to load"),
    "malicious-builtins-eval": (lambda marker: b"\x80\x02cbuiltins\neval\nq\x00X\x0b\x00\x00\x00__import__()q\x01"
                                               b"\x85q\x02Rq\x03.", "refused to load: the pickle asks for builtins.eval"),
    "numpy-object-array": (lambda marker: pickle.dumps(([np.array([b"x"], dtype=object)] * 2, [True]), protocol=2),
                           "refused to load: the pickle asks for numpy.dtype('O"),
    "truncated-pickle": (lambda marker: ref_bin(_good_entries(), [True, False])[:200], "not a readable .bin pickle"),
    "not-a-pickle": (lambda marker: b"hello world", "not a readable .bin pickle"),
    "not-a-pair": (lambda marker: pickle.dumps({"a": 1}, protocol=2), "expected a pickled (bins, issame_list) pair"),
    "flags-not-booleans": (lambda marker: ref_bin(_good_entries(), [True, False])[:-4] + b"K\x07lt.",
                           "issame_list must hold only booleans"),
    "images-for-pairs": (lambda marker: ref_bin(_good_entries()[:3], [True]), "3 images for 1 pairs"),
    "entry-not-an-image": (lambda marker: ref_bin([b"not an image", png(image_array(1))], [True]),
                           "(image 0): not a JPEG or PNG image"),
    "mixed-image-sizes": (lambda marker: ref_bin([png(image_array(0)), png(image_array(1, 20))], [True]),
                          "image 1 is (20, 20), image 0 is (16, 16)"),
}


@pytest.mark.parametrize("fault", list(BIN_FAULTS))
def test_faults_malicious_or_corrupt_bin_pack(workspace, monkeypatch, fault):
    """A ``.bin`` pack that is malicious (its pickle names a callable: nothing from it may run) or corrupt
    (``fault``): one line starting with the pack's path; no marker file; the earlier metrics file intact."""
    marker = workspace.root / "pwned"
    make, fragment = BIN_FAULTS[fault]
    pack = workspace.inputs / "lfw.bin"
    pack.write_bytes(make(marker))
    monkeypatch.setenv("FACEBENCH_LFW", str(pack))
    np.save(workspace.inputs / "features.npy", np.ones((4, 2)))
    line = eval_fault(workspace, "lfw", workspace.inputs / "features.npy", f"error: {pack}", fragment)
    assert not marker.exists()
    if fault.startswith("malicious") or fault == "numpy-object-array":
        assert "which a .bin pack never needs and which could run code; nothing from the file was used" in line


def test_faults_malicious_npy_features(workspace, monkeypatch):
    """``--features`` holding a pickled object array (``np.save(allow_pickle=True)``): refused without
    unpickling (no marker file), one line naming the .npy."""
    marker = workspace.root / "pwned"
    pack = workspace.inputs / "lfw.bin"
    pack.write_bytes(ref_bin([png(image_array(i)) for i in range(40)], [k % 2 == 0 for k in range(20)]))
    monkeypatch.setenv("FACEBENCH_LFW", str(pack))
    evil = workspace.inputs / "features.npy"
    np.save(evil, np.array([_Exploit(marker)] * 40, dtype=object), allow_pickle=True)
    eval_fault(workspace, "lfw", evil, f"error: {evil}: not a readable .npy features file")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# IJB and MegaFace meta files (moved from test_eval_ijb.py and test_eval_megaface.py)
# ----------------------------------------------------------------------------------------------------


def _ijbc(space: Workspace, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The hand-written IJB-C folder of test_eval_ijb.py and features for it; returns (folder, features)."""
    from tests.test_eval_ijb import _expected_image_features, write_ijbc

    folder = write_ijbc(space.inputs)
    monkeypatch.setenv("FACEBENCH_IJBC", str(folder))
    np.save(space.inputs / "features.npy", _expected_image_features())
    return folder, space.inputs / "features.npy"


def test_faults_ijb_1n_partly_missing(workspace, monkeypatch):
    """Issue 13: the galleries are there, ``ijbc_1N_probe_mixed.csv`` is not. 1:N used to be dropped with exit
    0 and a note inside the JSON; now one line naming the missing file, and the earlier --out file intact."""
    folder, features = _ijbc(workspace, monkeypatch)
    (folder / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    eval_fault(workspace, "ijbc", features, f"error: {folder / 'meta' / 'ijbc_1N_probe_mixed.csv'}: 1:N file not "
               "found, but ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv are there")


def test_faults_ijb_landmark_file_missing(workspace, monkeypatch):
    """``ijbc_name_5pts_score.txt`` missing: one line naming it and what it holds."""
    folder, features = _ijbc(workspace, monkeypatch)
    (folder / "meta" / "ijbc_name_5pts_score.txt").unlink()
    eval_fault(workspace, "ijbc", features, f"error: {folder / 'meta' / 'ijbc_name_5pts_score.txt'}: image, 5 "
               "landmarks (x y) and detector score file not found")


def test_faults_ijb_undecodable_loose_crop(workspace, monkeypatch):
    """A truncated JPEG among the loose crops: one line naming the crop."""
    folder, features = _ijbc(workspace, monkeypatch)
    (folder / "loose_crop" / "5.jpg").write_bytes(b"\xff\xd8 truncated")
    eval_fault(workspace, "ijbc", features, f"error: {folder / 'loose_crop' / '5.jpg'}: ")


def _megaface(space: Workspace, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tests.test_eval_megaface import write_megaface

    folder = write_megaface(space.inputs)
    monkeypatch.setenv("FACEBENCH_MEGAFACE", str(folder))
    return folder


def test_faults_megaface_probe_list_missing(workspace, monkeypatch):
    """The FaceScrub probe list missing from ``templatelists/``: one line naming it."""
    folder = _megaface(workspace, monkeypatch)
    (folder / "templatelists" / "facescrub_features_list.json").unlink()
    eval_fault(workspace, "megaface", workspace.inputs / "no-features",
               f"error: {folder / 'templatelists' / 'facescrub_features_list.json'}: list file not found")


def test_faults_megaface_distractor_list_shorter_than_its_name(workspace, monkeypatch):
    """``megaface_features_list.json_10_1`` holding 1 path: one line naming the list and both counts."""
    from tests.data_formats import ref_json_list

    folder = _megaface(workspace, monkeypatch)
    listed = folder / "templatelists" / "megaface_features_list.json_10_1"
    ref_json_list(listed, ["0/0@N00/0_0.jpg"])
    eval_fault(workspace, "megaface", workspace.inputs / "no-features",
               f"error: {listed}: the name says 10 distractors, the list holds 1")


# ----------------------------------------------------------------------------------------------------
# TinyFace and QMUL-SurvFace folders (bench eval): a missing folder or list, a list without its variable, a
# corrupt .mat, names and ids of different lengths, a listed image that is not there, a truncated image.
# Each used to be a KeyError, a scipy traceback or a silently shorter list; now one line naming the file.
# ----------------------------------------------------------------------------------------------------


def _tinyface_folder(space: Workspace, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tests.data_formats import ref_tinyface

    root = ref_tinyface(space.inputs / "tinyface", [("1_1.png", 1, image_array(1)), ("2_1.png", 2, image_array(2))],
                        [("1_2.png", 1, image_array(3)), ("2_2.png", 2, image_array(4))],
                        [("0001.png", image_array(5)), ("0002.png", image_array(6))])
    monkeypatch.setenv("FACEBENCH_TINYFACE", str(root))
    return root


def _survface_folder(space: Workspace, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tests.data_formats import ref_survface_identification, ref_survface_verification

    root = space.inputs / "QMUL-SurvFace"
    ref_survface_verification(root, {f"{k}_cam1_1.png": image_array(k) for k in range(1, 5)},
                              [("1_cam1_1.png", "2_cam1_1.png")], [("3_cam1_1.png", "4_cam1_1.png")])
    ref_survface_identification(root, [("1_cam1_2.png", 1, image_array(7)), ("2_cam1_2.png", 2, image_array(8))],
                                [("1_cam2_2.png", 1, image_array(9))], [("distractors_1.png", image_array(10))])
    monkeypatch.setenv("FACEBENCH_SURVFACE", str(root))
    return root


def _savemat(path: Path, variables: dict) -> None:
    from scipy.io import savemat

    savemat(str(path), variables)


def _tf_missing_testing_set(root: Path) -> tuple[str, ...]:
    import shutil

    shutil.rmtree(root / "Testing_Set")
    return (f"{root / 'Testing_Set'}: TinyFace test folder not found (also looked for "
            f"{root / 'tinyface' / 'Testing_Set'})",)


def _tf_missing_mat(root: Path) -> tuple[str, ...]:
    (root / "Testing_Set" / "probe_img_ID_pairs.mat").unlink()
    return (f"{root / 'Testing_Set' / 'probe_img_ID_pairs.mat'}: TinyFace id list not found (also looked for "
            f"{root / 'Face_Identification_Evaluation' / 'probe_img_ID_pairs.mat'})",)


def _tf_mat_missing_variable(root: Path) -> tuple[str, ...]:
    mat = root / "Testing_Set" / "probe_img_ID_pairs.mat"
    _savemat(mat, {"probe_set": np.array([["1_1.png"], ["2_1.png"]], dtype=object)})
    return f"{mat}: no variable 'probe_ids' (variables found: probe_set)",


def _tf_corrupt_mat(root: Path) -> tuple[str, ...]:
    mat = root / "Testing_Set" / "gallery_match_img_ID_pairs.mat"
    mat.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return f"{mat}: not a readable MATLAB .mat file (",


def _tf_lengths_differ(root: Path) -> tuple[str, ...]:
    mat = root / "Testing_Set" / "gallery_match_img_ID_pairs.mat"
    _savemat(mat, {"gallery_set": np.array([["1_2.png"], ["2_2.png"]], dtype=object),
                   "gallery_ids": np.array([[1.0]])})
    return f"{mat}: 2 names in 'gallery_set' but 1 ids in 'gallery_ids'",


def _tf_listed_image_missing(root: Path) -> tuple[str, ...]:
    (root / "Testing_Set" / "Probe" / "2_1.png").unlink()
    return (f"{root / 'Testing_Set' / 'Probe' / '2_1.png'}: listed in "
            f"{root / 'Testing_Set' / 'probe_img_ID_pairs.mat'} but the image file does not exist",)


def _tf_truncated_image(root: Path) -> tuple[str, ...]:
    image = root / "Testing_Set" / "Gallery_Distractor" / "0002.png"
    image.write_bytes(image.read_bytes()[:40])
    return f"{image}: ",


def _sf_missing_verification_folder(root: Path) -> tuple[str, ...]:
    import shutil

    shutil.rmtree(root / "Face_Verification_Test_Set")
    return f"{root / 'Face_Verification_Test_Set'}: QMUL-SurvFace test folder not found",


def _sf_missing_pair_mat(root: Path) -> tuple[str, ...]:
    (root / "Face_Verification_Test_Set" / "negative_pairs_names.mat").unlink()
    return (f"{root / 'Face_Verification_Test_Set' / 'negative_pairs_names.mat'}: SurvFace verification pair list "
            f"not found (also looked for {root / 'Face_Verification_Evaluation' / 'negative_pairs_names.mat'})",)


def _sf_pair_mat_missing_variable(root: Path) -> tuple[str, ...]:
    mat = root / "Face_Verification_Test_Set" / "positive_pairs_names.mat"
    _savemat(mat, {"pairs": np.array([["1_cam1_1.png", "2_cam1_1.png"]], dtype=object)})
    return f"{mat}: no variable 'positive_pairs_names' (variables found: pairs)",


def _sf_corrupt_mat(root: Path) -> tuple[str, ...]:
    mat = root / "Face_Identification_Test_Set" / "gallery_img_ID_pairs.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file" + np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes())
    return f"{mat}: not a readable MATLAB .mat file (",


def _sf_lengths_differ(root: Path) -> tuple[str, ...]:
    mat = root / "Face_Identification_Test_Set" / "mated_probe_img_ID_pairs.mat"
    _savemat(mat, {"mated_probe_set": np.array([["1_cam2_2.png"]], dtype=object),
                   "mated_probe_ids": np.array([[1.0], [2.0]])})
    return f"{mat}: 1 names in 'mated_probe_set' but 2 ids in 'mated_probe_ids'",


def _sf_listed_image_missing(root: Path) -> tuple[str, ...]:
    image = root / "Face_Verification_Test_Set" / "verification_images" / "4_cam1_1.png"
    image.unlink()
    return f"{image}: listed in {root / 'Face_Verification_Test_Set' / 'negative_pairs_names.mat'} but the image",


def _sf_truncated_image(root: Path) -> tuple[str, ...]:
    image = root / "Face_Identification_Test_Set" / "unmated_probe" / "distractors_1.png"
    image.write_bytes(image.read_bytes()[:40])
    return f"{image}: ",


LOWRES_FAULTS: dict[str, tuple[str, Callable[[Path], tuple[str, ...]]]] = {
    "tinyface-missing-testing-set": ("tinyface", _tf_missing_testing_set),
    "tinyface-missing-mat": ("tinyface", _tf_missing_mat),
    "tinyface-mat-missing-variable": ("tinyface", _tf_mat_missing_variable),
    "tinyface-corrupt-mat": ("tinyface", _tf_corrupt_mat),
    "tinyface-names-and-ids-differ": ("tinyface", _tf_lengths_differ),
    "tinyface-listed-image-missing": ("tinyface", _tf_listed_image_missing),
    "tinyface-truncated-image": ("tinyface", _tf_truncated_image),
    "survface-missing-verification-folder": ("survface", _sf_missing_verification_folder),
    "survface-missing-pair-mat": ("survface", _sf_missing_pair_mat),
    "survface-pair-mat-missing-variable": ("survface", _sf_pair_mat_missing_variable),
    "survface-corrupt-mat": ("survface", _sf_corrupt_mat),
    "survface-names-and-ids-differ": ("survface", _sf_lengths_differ),
    "survface-listed-image-missing": ("survface", _sf_listed_image_missing),
    "survface-truncated-image": ("survface", _sf_truncated_image),
}


@pytest.mark.parametrize("fault", list(LOWRES_FAULTS))
def test_faults_tinyface_and_survface_files_are_one_line_naming_the_file(workspace, monkeypatch, fault):
    """A broken TinyFace or QMUL-SurvFace folder (``fault``): ``bench eval`` refuses it in one line that starts
    with the file's path (and, for a missing list, every place looked in); the inputs and the earlier metrics
    file are left as they were."""
    protocol, make = LOWRES_FAULTS[fault]
    root = (_tinyface_folder if protocol == "tinyface" else _survface_folder)(workspace, monkeypatch)
    fragments = make(root)
    eval_fault(workspace, protocol, workspace.inputs / "features.npy", f"error: {fragments[0]}", *fragments[1:])
