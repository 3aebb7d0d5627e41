"""RecordIO: framing, IRHeader payloads, both dataset layouts, labels without decoding, and every corrupt input.

References are independent of the library: hand-written bytes and offsets, and the writer/reader of
``tests/data_formats.py`` (coded apart from bench.data.recordio).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from data_formats import (MAGIC_LE, image_array, jpeg, png, ref_frame, ref_pack, ref_read, ref_unpack, ref_write,
                          write_im2rec, write_insightface)

from bench.data import encoded as encoded_module
from bench.data import recordio
from bench.data.recordio import (RecordDataset, RecordFile, RecordWriter, frame_record, pack_payload, read_property,
                                 unpack_payload)
from bench.errors import DataError


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ framing


def test_frame_matches_hand_written_bytes() -> None:
    # 3-byte payload: magic, lrec = 3 (cflag 0), the bytes, one zero of padding.
    assert frame_record(b"\x01\x02\x03") == MAGIC_LE + b"\x03\x00\x00\x00" + b"\x01\x02\x03\x00"
    # An aligned magic at offset 4 splits the record: first part (cflag 1, 4 bytes), last part (cflag 3, 3 bytes).
    payload = b"ABCD" + MAGIC_LE + b"EFG"
    expected = (MAGIC_LE + struct.pack("<I", (1 << 29) | 4) + b"ABCD"
                + MAGIC_LE + struct.pack("<I", (3 << 29) | 3) + b"EFG\x00")
    assert frame_record(payload) == expected
    # A magic at an unaligned offset is data: no split.
    unaligned = b"AB" + MAGIC_LE + b"CD"
    assert frame_record(unaligned) == MAGIC_LE + struct.pack("<I", 8) + unaligned
    # Magic as the last aligned word: an empty last part.
    assert frame_record(b"ABCD" + MAGIC_LE) == (MAGIC_LE + struct.pack("<I", (1 << 29) | 4) + b"ABCD"
                                                + MAGIC_LE + struct.pack("<I", 3 << 29))
    # Two magics: first, middle, last parts.
    double = MAGIC_LE + b"WXYZ" + MAGIC_LE + b"Q"
    assert frame_record(double) == (MAGIC_LE + struct.pack("<I", 1 << 29)
                                    + MAGIC_LE + struct.pack("<I", (2 << 29) | 4) + b"WXYZ"
                                    + MAGIC_LE + struct.pack("<I", (3 << 29) | 1) + b"Q\x00\x00\x00")


@pytest.mark.parametrize("payload", [b"", b"x", b"xy", b"xyz", b"wxyz", MAGIC_LE, MAGIC_LE * 3 + b"odd",
                                     b"pad" + MAGIC_LE + b"pad" + MAGIC_LE, bytes(range(256)) * 3 + MAGIC_LE + b"!"])
def test_frame_agrees_with_the_reference_writer_and_reads_back(tmp_path, payload) -> None:
    assert frame_record(payload) == ref_frame(payload)
    ref_write(tmp_path, [(5, b"before"), (9, payload), (2, b"after!!")])
    file = RecordFile(tmp_path / "train.rec")
    assert [file.read(k) for k in (5, 9, 2)] == [b"before", payload, b"after!!"]


def test_writer_bytes_and_offsets_equal_the_reference(tmp_path) -> None:
    payloads = [(3, ref_pack(1.0, b"odd", 3)), (1, ref_pack([7, 1.0], b"\xff\xd8" + MAGIC_LE + b"\xff\xd9", 1)),
                (0, ref_pack([4, 9], b"", 0))]
    with RecordWriter(tmp_path / "mine.rec", tmp_path / "mine.idx") as writer:
        offsets = [writer.write(key, payload) for key, payload in payloads]
    reference_offsets = ref_write(tmp_path, payloads, name="ref")
    assert (tmp_path / "mine.rec").read_bytes() == (tmp_path / "ref.rec").read_bytes()
    assert (tmp_path / "mine.idx").read_text() == (tmp_path / "ref.idx").read_text()
    # Hand-computed: the first payload is 24 + 3 = 27 bytes, framed as 8 + 27 + 1 padding = 36. The second is
    # 24 + 8 (two labels) + 8 = 40 bytes; its magic sits at payload offset 34, unaligned, so it is one part of
    # 8 + 40 = 48 bytes: offsets 0, 36, 84.
    assert offsets == reference_offsets == [0, 36, 84]
    assert (tmp_path / "mine.idx").read_text() == "3\t0\n1\t36\n0\t84\n"


def test_writer_leaves_nothing_behind_when_interrupted(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
            writer.write(0, b"data")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ payloads


@pytest.mark.parametrize("label", [3.0, 0.0, [5.0, 1.0], [12.0, 34.0], np.array([1.5, 2.5, 3.5], np.float32)])
def test_pack_payload_matches_mxnet_layout(label) -> None:
    image = b"\xff\xd8jpeg\xff\xd9"
    payload = pack_payload(label, image, id=17, id2=4)
    assert payload == ref_pack(label, image, 17, 4)
    header, rest = unpack_payload(payload)
    assert rest == image and header.id == 17 and header.id2 == 4
    if np.ndim(label) == 0:
        assert header.flag == 0 and header.label == label
    else:
        assert header.flag == len(label) and header.label.tolist() == list(np.asarray(label, np.float32))
        assert header.class_label == float(np.asarray(label)[0])


def test_unpack_rejects_short_payloads() -> None:
    with pytest.raises(DataError, match="shorter than the 24-byte IRHeader"):
        unpack_payload(b"\x00" * 10, "x.rec: key 3")
    with pytest.raises(DataError, match="announces 5 label values"):
        unpack_payload(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\x00" * 8, "x.rec: key 3")


def test_property_first_line_only(tmp_path) -> None:
    (tmp_path / "property").write_text("85742,112,112\n5822653\nshuffled\n")
    assert read_property(tmp_path / "property") == (85742, 112, 112)
    (tmp_path / "property").write_text("85742;112;112\n")
    with pytest.raises(DataError, match="num_classes,H,W"):
        read_property(tmp_path / "property")


# ------------------------------------------------------------------------------------------------ layouts


def _groups() -> tuple[list[list[bytes]], list[list[np.ndarray]]]:
    """3 identities of 3, 1 and 4 images: PNGs (exact pixels), a JPEG, and a JPEG whose payload holds an
    aligned magic and has an odd length (JPEG decoders ignore bytes after the end-of-image marker)."""
    arrays = [[image_array(10 * c + i) for i in range(n)] for c, n in enumerate((3, 1, 4))]
    groups = [[png(a) for a in group] for group in arrays]
    groups[2][1] = jpeg(arrays[2][1])
    tricky = jpeg(arrays[2][3])
    # Payload = 24 header + 8 label bytes + image: an image offset that is a multiple of 4 is aligned.
    tricky += b"\0" * (-len(tricky) % 4) + MAGIC_LE + b"odd"
    groups[2][3] = tricky
    return groups, arrays


@pytest.mark.parametrize("array_labels", [True, False], ids=["face2rec2", "recbuilder"])
def test_insightface_layout_reads_back_exactly(tmp_path, array_labels) -> None:
    groups, arrays = _groups()
    expected_labels = write_insightface(tmp_path, groups, array_labels=array_labels, id2=0 if array_labels else 1)
    raw = (tmp_path / "train.rec").read_bytes()
    if array_labels:  # the tricky payload really was split into parts
        assert raw.count(MAGIC_LE) > 8 + 3 + 1
    dataset = RecordDataset(tmp_path)
    assert dataset.layout == "insightface"
    assert dataset.labels.tolist() == expected_labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert dataset.num_classes == 3 and dataset.image_size == (16, 16) and len(dataset) == 8
    flat = [b for g in groups for b in g]
    for index in range(8):
        assert dataset.encoded(index) == flat[index]
        assert dataset.key_of(index) == index + 1
    flat_arrays = [a for g in arrays for a in g]
    for index in (0, 1, 2, 3, 4, 6):  # the PNGs decode to the exact pixels
        assert np.array_equal(dataset.decode(index), flat_arrays[index])
    assert dataset.decode(7).shape == (16, 16, 3)
    identity_index = dataset.identity_index()
    assert identity_index.members(2).tolist() == [4, 5, 6, 7]
    assert identity_index.counts.tolist() == [3, 1, 4]
    # Nothing was cached: the insightface layout's labels come from its identity records.
    assert not list(tmp_path.glob("*.labels.*"))


def test_im2rec_layout_reads_back_exactly_and_caches_labels(tmp_path, monkeypatch) -> None:
    groups, arrays = _groups()
    images = [b for g in groups for b in g]
    labels = [0, 0, 0, 1, 2, 2, 2, 2]
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    write_im2rec(tmp_path, images, labels, order)
    dataset = RecordDataset(tmp_path)
    assert dataset.layout == "im2rec"
    # Pool order is .idx order.
    assert dataset.labels.tolist() == [labels[k] for k in order]
    for index, key in enumerate(order):
        assert dataset.key_of(index) == key and dataset.encoded(index) == images[key]
    assert np.array_equal(dataset.decode(1), arrays[0][0])
    assert (tmp_path / "train.rec.labels.npy").is_file()

    # Second open: from the cache, no header pass.
    monkeypatch.setattr(RecordFile, "scan_headers", lambda *a, **k: pytest.fail("labels were not cached"))
    assert RecordDataset(tmp_path).labels.tolist() == dataset.labels.tolist()


def test_im2rec_label_cache_is_rebuilt_when_the_file_changes(tmp_path) -> None:
    images = [png(image_array(i)) for i in range(4)]
    write_im2rec(tmp_path, images, [0, 1, 1, 0], [0, 1, 2, 3])
    assert RecordDataset(tmp_path).labels.tolist() == [0, 1, 1, 0]
    write_im2rec(tmp_path, images + [png(image_array(9))], [1, 0, 0, 1, 1], [4, 3, 2, 1, 0])
    assert RecordDataset(tmp_path).labels.tolist() == [1, 1, 0, 0, 1]


def test_label_cache_goes_under_the_data_root_when_the_data_folder_is_read_only(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    write_im2rec(data, [png(image_array(i)) for i in range(3)], [0, 1, 0], [2, 0, 1])
    real_access = encoded_module.os.access
    monkeypatch.setattr(encoded_module.os, "access",
                        lambda p, mode: False if str(p).startswith(str(data)) else real_access(p, mode))
    labels = RecordDataset(data, cache_root=tmp_path / "root").labels
    assert labels.tolist() == [0, 0, 1]
    assert not list(data.glob("*.labels.*"))
    assert len(list((tmp_path / "root" / "cache").rglob("labels.npy"))) == 1


def test_array_labels_in_im2rec_layout_use_the_first_value(tmp_path) -> None:
    # shuffle_rec.py-style files may keep array labels; key 0 has an image, so it is not a header.
    images = [png(image_array(i)) for i in range(3)]
    ref_write(tmp_path, [(k, ref_pack([lab, 1.0], images[k], k)) for k, lab in ((0, 2), (1, 0), (2, 1))])
    (tmp_path / "property").write_text("3,16,16\n")
    dataset = RecordDataset(tmp_path)
    assert dataset.layout == "im2rec" and dataset.labels.tolist() == [2, 0, 1]


def test_inexact_float32_ranges_fall_back_to_the_image_records(tmp_path, monkeypatch) -> None:
    # Pretend float32 were exact only up to 4: the header's range is no longer trusted (Glint360K's case).
    groups, _ = _groups()
    expected = write_insightface(tmp_path, groups)
    monkeypatch.setattr(recordio, "FLOAT32_EXACT_LIMIT", 4)
    dataset = RecordDataset(tmp_path)
    assert dataset.layout == "insightface" and dataset.labels.tolist() == expected.tolist()


def test_inconsistent_identity_records_fall_back_to_the_image_records(tmp_path) -> None:
    # Identity records out of class order: their ranges do not tile the images, the image labels win.
    groups = [[png(image_array(i))] * n for i, n in enumerate((2, 3))]
    records = [(1, ref_pack([0, 1], groups[0][0], 1)), (2, ref_pack([0, 1], groups[0][1], 2)),
               (3, ref_pack([1, 1], groups[1][0], 3)), (4, ref_pack([1, 1], groups[1][1], 4)),
               (5, ref_pack([1, 1], groups[1][2], 5)),
               (6, ref_pack([3, 6], b"", 6)), (7, ref_pack([1, 3], b"", 7)), (0, ref_pack([6, 8], b"", 0))]
    ref_write(tmp_path, records)
    (tmp_path / "property").write_text("2,16,16\n")
    assert RecordDataset(tmp_path).labels.tolist() == [0, 0, 1, 1, 1]


def test_independent_reader_agrees_on_a_library_written_file(tmp_path) -> None:
    payloads = [(k, pack_payload(float(k % 3), bytes([k]) * (k * 7 % 13) + MAGIC_LE * (k % 2), id=k)) for k in range(20)]
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, payload in payloads:
            writer.write(key, payload)
    assert ref_read(tmp_path / "train.rec", tmp_path / "train.idx") == payloads
    for key, payload in payloads:
        flag, label, id_, image = ref_unpack(payload)
        assert (flag, label, id_) == (0, float(key % 3), key)


# ------------------------------------------------------------------------------------------------ corrupt inputs


def _im2rec(tmp_path, n: int = 6):
    images = [png(image_array(i)) for i in range(n)]
    write_im2rec(tmp_path, images, [i % 3 for i in range(n)], list(range(n)))
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    return images, offsets


# Corrupt packs and indices found when a dataset is opened (bad magic, truncation, .idx lines and offsets,
# property, header, labels) are in tests/faults/test_faults_inputs.py, through `bench run`. What stays here is
# the direct record read, a second code path (os.pread part by part, not the vectorised label pass).


def test_direct_read_of_a_bad_magic_names_file_key_and_offset(tmp_path) -> None:
    """RecordFile.read on a record whose magic is overwritten. Catches the part-by-part reader accepting
    garbage or losing the key and offset in its message."""
    _, offsets = _im2rec(tmp_path)
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    raw[offsets[3]:offsets[3] + 4] = b"JUNK"
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    with pytest.raises(DataError) as exc:
        RecordFile(tmp_path / "train.rec").read(3)
    assert f"train.rec: key 3 at offset {offsets[3]}: bad magic" in one_line(exc)


def test_direct_read_of_a_truncated_record(tmp_path) -> None:
    """RecordFile.read of a record cut short by the end of the file (whole and split records). Catches a
    reader that returns the short payload."""
    _, offsets = _im2rec(tmp_path)
    raw = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(raw[:offsets[5] + 30])
    with pytest.raises(DataError) as exc:
        RecordFile(tmp_path / "train.rec").read(5)
    assert f"key 5 at offset {offsets[5]}: truncated record" in one_line(exc)
    ref_write(tmp_path / "split", [(0, ref_pack(0.0, b"ABCD" * 3 + MAGIC_LE + b"tail-bytes", 0))])
    raw = (tmp_path / "split" / "train.rec").read_bytes()
    (tmp_path / "split" / "train.rec").write_bytes(raw[:-12])
    with pytest.raises(DataError) as exc:
        RecordFile(tmp_path / "split" / "train.rec").read(0)
    assert "key 0 at offset 0: truncated record" in one_line(exc)


def test_undecodable_image_names_file_key_and_offset(tmp_path) -> None:
    images = [png(image_array(0)), b"\xff\xd8 this is not a jpeg", png(image_array(2))]
    write_im2rec(tmp_path, images, [0, 1, 0], [0, 1, 2])
    offset = int((tmp_path / "train.idx").read_text().splitlines()[1].split("\t")[1])
    dataset = RecordDataset(tmp_path)  # labels need no decoding
    assert dataset.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError) as exc:
        dataset.decode(1)
    assert f"train.rec: key 1 at offset {offset}: undecodable image" in one_line(exc)


def test_wrong_image_size_is_an_error(tmp_path) -> None:
    write_im2rec(tmp_path, [png(image_array(0)), png(image_array(1, size=20))], [0, 1], [0, 1])
    with pytest.raises(DataError, match="key 1 at offset .*: image is 20x20, but this dataset's images are 16x16"):
        RecordDataset(tmp_path).decode(1)


def test_a_record_label_that_disagrees_is_never_silent(tmp_path) -> None:
    # Identity records say image 3 is class 1, the image record says class 2.
    groups = [[png(image_array(0)), png(image_array(1))], [png(image_array(2))]]
    records = [(1, ref_pack([0, 1], groups[0][0], 1)), (2, ref_pack([0, 1], groups[0][1], 2)),
               (3, ref_pack([2, 1], groups[1][0], 3)),
               (4, ref_pack([1, 3], b"", 4)), (5, ref_pack([3, 4], b"", 5)), (0, ref_pack([4, 6], b"", 0))]
    ref_write(tmp_path, records)
    (tmp_path / "property").write_text("3,16,16\n")
    dataset = RecordDataset(tmp_path)
    assert dataset.labels.tolist() == [0, 0, 1]
    with pytest.raises(DataError) as exc:
        dataset.decode(2)
    assert "key 3 at offset" in one_line(exc) and "record label 2 disagrees with label 1" in str(exc.value)

