"""Independent references for the data tests: a RecordIO writer/reader coded apart from bench.data.recordio.

Written from the format description (``/work/shared/reference/eval_formats.md`` §1, checked byte for byte
against mxnet 1.9.1 there) in a different style from the library: a loop over aligned 4-byte words as in
dmlc-core's ``RecordIOWriter::WriteRecord``, literal magic bytes, ``int.to_bytes`` instead of ``struct``.
The tests compare the library's bytes with these and read files these wrote.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np

MAGIC_LE = b"\x0a\x23\xd7\xce"  # 0xced7230a little-endian


def ref_frame(payload: bytes) -> bytes:
    out, start, split = b"", 0, False
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i:i + 4] == MAGIC_LE:
            cflag = 2 if split else 1
            out += MAGIC_LE + ((cflag << 29) | (i - start)).to_bytes(4, "little") + payload[start:i]
            start, split = i + 4, True
    rest = payload[start:]
    cflag = 3 if split else 0
    return out + MAGIC_LE + ((cflag << 29) | len(rest)).to_bytes(4, "little") + rest + b"\0" * (-len(rest) % 4)


def ref_pack(label, image: bytes, id_: int, id2: int = 0) -> bytes:
    if np.ndim(label) == 0:
        return struct.pack("<IfQQ", 0, float(label), id_, id2) + image
    values = np.asarray(label, dtype="<f4")
    return struct.pack("<IfQQ", values.size, 0.0, id_, id2) + values.tobytes() + image


def ref_write(directory: Path, records: list[tuple[int, bytes]], name: str = "train") -> list[int]:
    """Write ``records`` ((key, payload), in order) as ``<name>.rec``/``.idx``; returns the offsets."""
    directory.mkdir(parents=True, exist_ok=True)
    blob, offsets, lines = b"", [], []
    for key, payload in records:
        offsets.append(len(blob))
        lines.append(f"{key}\t{len(blob)}\n")
        blob += ref_frame(payload)
    (directory / f"{name}.rec").write_bytes(blob)
    (directory / f"{name}.idx").write_text("".join(lines))
    return offsets


def ref_read(rec: Path, idx: Path) -> list[tuple[int, bytes]]:
    """(key, payload) in .idx order, parsing the parts with plain slicing."""
    data = rec.read_bytes()
    out = []
    for line in idx.read_text().splitlines():
        key, offset = (int(x) for x in line.split("\t"))
        payload, position = b"", offset
        while True:
            assert data[position:position + 4] == MAGIC_LE
            lrec = int.from_bytes(data[position + 4:position + 8], "little")
            length, cflag = lrec & (2**29 - 1), lrec >> 29
            payload += data[position + 8:position + 8 + length]
            position += 8 + length + (-length % 4)
            if cflag in (0, 3):
                break
            payload += MAGIC_LE
        out.append((key, payload))
    return out


def ref_unpack(payload: bytes) -> tuple[int, object, int, bytes]:
    flag, label, id_, _ = struct.unpack("<IfQQ", payload[:24])
    if flag:
        return flag, np.frombuffer(payload[24:24 + 4 * flag], "<f4").tolist(), id_, payload[24 + 4 * flag:]
    return flag, label, id_, payload[24:]


def image_array(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_insightface(directory: Path, groups: list[list[bytes]], array_labels: bool = True, size: int = 16,
                      id2: int = 0) -> np.ndarray:
    """face2rec2 (``[class, 1.0]`` labels) or RecBuilder (scalar) layout; returns the expected labels."""
    records, key, ranges = [], 1, []
    for cls, images in enumerate(groups):
        start = key
        for image in images:
            records.append((key, ref_pack([cls, 1.0] if array_labels else cls, image, key)))
            key += 1
        ranges.append((start, key))
    first_identity = key
    for start, end in ranges:
        records.append((key, ref_pack([start, end], b"", key)))
        key += 1
    records.append((0, ref_pack([first_identity, key], b"", 0, id2)))
    ref_write(directory, records)
    (directory / "property").write_text(f"{len(groups)},{size},{size}\n")
    return np.repeat(np.arange(len(groups)), [len(g) for g in groups])


def write_im2rec(directory: Path, images: list[bytes], labels: list[int], order: list[int], size: int = 16,
                 num_classes: int | None = None) -> None:
    """Shuffled im2rec layout: key = id = position in ``images``, written in ``order``, scalar labels."""
    records = [(i, ref_pack(float(labels[i]), images[i], i)) for i in order]
    ref_write(directory, records)
    (directory / "property").write_text(f"{num_classes or max(labels) + 1},{size},{size}\n")


# ---------------------------------------------------------------------------------------------------------
# insightface .bin verification packs (eval_formats.md §2.1), coded apart from bench.eval.formats.bin:
# the same objects spelled with other opcodes (MARK ... LIST / TUPLE, no memo), which any unpickler accepts.


def ref_bin(entries: list[bytes], issame: list[bool]) -> bytes:
    """``(bins, issame_list)`` as CPython 2.7 ``protocol=2`` objects: py2 ``str`` entries (BINSTRING ``T`` with a
    4-byte length), ``bool`` flags (NEWTRUE / NEWFALSE), a tuple of two lists. Loads only with ``encoding='bytes'``."""
    out = b"\x80\x02(("
    for entry in entries:
        out += b"T" + len(entry).to_bytes(4, "little") + entry
    out += b"l("
    out += b"".join(b"\x88" if same else b"\x89" for same in issame)
    return out + b"lt."


def _py2_str(data: bytes) -> bytes:
    return b"T" + len(data).to_bytes(4, "little") + data


def _py2_uint8_array(data: bytes) -> bytes:
    """A 1-D uint8 numpy array as numpy pickles it under Python 2 (``_reconstruct`` + BUILD with a py2 str)."""
    dtype = (b"cnumpy\ndtype\n(" + _py2_str(b"u1") + b"K\x00K\x01tR"
             b"(K\x03" + _py2_str(b"|") + b"NNNJ" + (-1).to_bytes(4, "little", signed=True) + b"J"
             + (-1).to_bytes(4, "little", signed=True) + b"K\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00t" + _py2_str(b"b") + b"tR"
            b"(K\x01(J" + len(data).to_bytes(4, "little") + b"t" + dtype + b"\x89" + _py2_str(data) + b"tb")


def ref_bin_arrays(entries: list[bytes], issame: list[bool]) -> bytes:
    """As :func:`ref_bin`, but each entry a uint8 numpy array (``cv2.imencode``'s output in cfp2pack/agedb2pack)."""
    out = b"\x80\x02((" + b"".join(_py2_uint8_array(entry) for entry in entries) + b"l("
    out += b"".join(b"\x88" if same else b"\x89" for same in issame)
    return out + b"lt."


def ref_read_bin(data: bytes) -> tuple[list[bytes], list[bool]]:
    """The entries (as bytes) and flags of a ``.bin``, with the standard library's unpickler (trusted input only)."""
    import pickle

    bins, issame = pickle.loads(data, encoding="bytes")
    return [bytes(np.asarray(b, dtype=np.uint8).ravel()) if not isinstance(b, bytes) else b for b in bins], list(issame)


# ---------------------------------------------------------------------------------------------------------
# MegaFace devkit files (eval_formats.md §4.1): OpenCV Mat feature files and JSON lists.


def ref_feature_bytes(vector: np.ndarray) -> bytes:
    """``matio.py``'s layout: int32 rows, cols, row stride in bytes, cv type (5 = CV_32F), then the float32 data."""
    values = np.asarray(vector, dtype="<f4").ravel()
    header = b"".join(v.to_bytes(4, "little", signed=True) for v in (values.size, 1, 4, 5))
    return header + values.tobytes()


def ref_read_feature(path: Path) -> np.ndarray:
    data = Path(path).read_bytes()
    rows, cols, stride, cv_type = (int.from_bytes(data[i:i + 4], "little", signed=True) for i in range(0, 16, 4))
    assert cv_type == 5 and stride == 4 * cols, (rows, cols, stride, cv_type)
    return np.frombuffer(data[16:16 + rows * stride], dtype="<f4").reshape(rows * cols)


def ref_json_list(path: Path, paths: list[str], ids: list[str] | None = None) -> None:
    """A devkit template list: ``{"path": [...]}`` plus ``"id"`` for the FaceScrub probe list."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"path": paths, **({"id": ids} if ids is not None else {})}))


# ---------------------------------------------------------------------------------------------------------
# TinyFace and QMUL-SurvFace test folders, coded apart from bench.eval.formats.tinyface / .survface from the
# published layouts (TinyFace readme.txt; QMUL-SurvFace readme.txt): folders and file names typed out here,
# cells built as nested lists, images saved by PIL (format from the suffix), ids as uint16 (TinyFace) or
# double (SurvFace) columns.


def ref_image_file(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _ref_savemat(path: Path, variables: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), variables)


def ref_tinyface(root: Path, probes: list, gallery: list, distractors: list, mat_folder: str = "Testing_Set") -> Path:
    """``root/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/`` and the two id lists in ``root/<mat_folder>``.

    ``probes`` and ``gallery``: ``(file name, id, HWC array)``; ``distractors``: ``(relative name, HWC array)``."""
    testing = root / "Testing_Set"
    for folder, entries in (("Probe", probes), ("Gallery_Match", gallery)):
        for name, _, array in entries:
            ref_image_file(testing / folder / name, array)
    for name, array in distractors:
        ref_image_file(testing / "Gallery_Distractor" / name, array)
    (testing / "Gallery_Distractor").mkdir(parents=True, exist_ok=True)
    _ref_savemat(root / mat_folder / "gallery_match_img_ID_pairs.mat", {
        "gallery_set": np.array([[name] for name, _, _ in gallery], dtype=object),
        "gallery_ids": np.array([[identity] for _, identity, _ in gallery], dtype=np.uint16)})
    _ref_savemat(root / mat_folder / "probe_img_ID_pairs.mat", {
        "probe_set": np.array([[name] for name, _, _ in probes], dtype=object),
        "probe_ids": np.array([[identity] for _, identity, _ in probes], dtype=np.uint16)})
    return root


def ref_survface_verification(root: Path, images: dict, positives: list, negatives: list) -> Path:
    """``root/Face_Verification_Test_Set/``: ``verification_images/<name>`` for each of ``images`` (name -> HWC
    array) and the two ``P x 2`` name cells ``positive_pairs_names`` / ``negative_pairs_names``."""
    folder = root / "Face_Verification_Test_Set"
    for name, array in images.items():
        ref_image_file(folder / "verification_images" / name, array)
    for variable, pairs in (("positive_pairs_names", positives), ("negative_pairs_names", negatives)):
        _ref_savemat(folder / f"{variable}.mat", {variable: np.array([[a, b] for a, b in pairs], dtype=object)})
    return folder


def ref_survface_identification(root: Path, gallery: list, mated: list, unmated: list,
                                mat_folder: str = "Face_Identification_Test_Set") -> Path:
    """``root/Face_Identification_Test_Set/{gallery,mated_probe,unmated_probe}/`` and the gallery and mated-probe
    id lists in ``root/<mat_folder>``. ``gallery``, ``mated``: ``(name, id, HWC array)``; ``unmated``: ``(name,
    HWC array)``."""
    folder = root / "Face_Identification_Test_Set"
    for sub, entries in (("gallery", gallery), ("mated_probe", mated)):
        for name, _, array in entries:
            ref_image_file(folder / sub / name, array)
    for name, array in unmated:
        ref_image_file(folder / "unmated_probe" / name, array)
    (folder / "unmated_probe").mkdir(parents=True, exist_ok=True)
    for mat, prefix, entries in (("gallery_img_ID_pairs.mat", "gallery", gallery),
                                 ("mated_probe_img_ID_pairs.mat", "mated_probe", mated)):
        _ref_savemat(root / mat_folder / mat, {
            f"{prefix}_set": np.array([[name] for name, _, _ in entries], dtype=object),
            f"{prefix}_ids": np.array([[float(identity)] for _, identity, _ in entries])})
    return folder


def ref_read_cell(path: Path, variable: str) -> list[list[str]]:
    """A MATLAB cell of names as rows of strings (``scipy.io.loadmat``'s nesting: each cell a 1-element array)."""
    from scipy.io import loadmat

    return [[str(cell[0]) for cell in row] for row in loadmat(str(path))[variable]]
