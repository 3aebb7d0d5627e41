"""Image folders of both shapes, labels in sorted folder order, and packing a folder into an im2rec RecordIO."""

from __future__ import annotations

import random

import numpy as np
import pytest
from data_formats import image_array, jpeg, png, ref_read, ref_unpack

from bench.data.folder import FolderDataset, pack_folder
from bench.data.recordio import RecordDataset
from bench.errors import DataError

# Identity names whose sorted order differs from creation order and from numeric order ("10" < "9").
IDENTITIES = {"9": 2, "b": 1, "10": 3, "a": 2}


def _make_flat(root, identities=IDENTITIES, seed=0):
    """root/<identity>/<image>; returns {relative path: pixels}."""
    pixels = {}
    for number, (identity, count) in enumerate(identities.items()):
        folder = root / identity
        folder.mkdir(parents=True)
        for i in range(count):
            array = image_array(seed + 100 * number + i)
            (folder / f"{count - i:02d}.png").write_bytes(png(array))
            pixels[f"{identity}/{count - i:02d}.png"] = array
    return pixels


def test_flat_folder_labels_and_pixels(tmp_path) -> None:
    pixels = _make_flat(tmp_path)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("top-level file")
    (tmp_path / "empty").mkdir()
    dataset = FolderDataset(tmp_path)
    assert dataset.layout == "flat" and dataset.skipped == 2
    # Independent reference: sorted identity names, then sorted file names.
    names = sorted(IDENTITIES)
    expected = [(name, f) for name in names for f in sorted(p.split("/")[1] for p in pixels if p.startswith(name + "/"))]
    assert names == ["10", "9", "a", "b"]
    assert dataset.labels.tolist() == [names.index(n) for n, _ in expected] == [0, 0, 0, 1, 1, 2, 2, 3]
    assert dataset.num_classes == 4 and dataset.image_size == (16, 16)
    for index, (name, file) in enumerate(expected):
        assert dataset.file_path(index) == tmp_path / name / file
        assert np.array_equal(dataset.decode(index), pixels[f"{name}/{file}"])
    assert dataset.identity_index().counts.tolist() == [3, 2, 2, 1]


def test_sharded_folder_labels_and_shards(tmp_path) -> None:
    shard_a = _make_flat(tmp_path / "0", {"0_0_x": 2, "0_0_a": 1})
    shard_b = _make_flat(tmp_path / "1", {"1_5_z": 1, "1_0_y": 3}, seed=50)
    (tmp_path / "1" / "stray.jpg.txt").write_text("skip me")
    dataset = FolderDataset(tmp_path)
    assert dataset.layout == "sharded" and dataset.skipped == 1
    order = ["0/0_0_a", "0/0_0_x", "1/1_0_y", "1/1_5_z"]
    assert [d.decode() for d in dataset.identity_dirs] == order
    assert dataset.labels.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert dataset.shard_samples() == [("0", 0), ("1", 3)]
    all_pixels = {f"0/{k}": v for k, v in shard_a.items()} | {f"1/{k}": v for k, v in shard_b.items()}
    for index in range(len(dataset)):
        relative = dataset.file_path(index).relative_to(tmp_path).as_posix()
        assert np.array_equal(dataset.decode(index), all_pixels[relative])


def test_empty_and_absent_folders_are_errors(tmp_path) -> None:
    """FolderDataset's own messages for a root without identity folders and a missing root (`bench run`
    finds these in dataset location first; a mixed tree, a folder without images and a broken first image
    are in tests/faults/test_faults_inputs.py). Catches an empty dataset accepted with zero classes."""
    (tmp_path / "no_ids").mkdir()
    with pytest.raises(DataError, match="no identity folders"):
        FolderDataset(tmp_path / "no_ids")
    with pytest.raises(DataError, match="image folder not found"):
        FolderDataset(tmp_path / "absent")


def test_undecodable_and_missing_images_name_the_file(tmp_path) -> None:
    """Decoding a broken or vanished image (not the first: that one is checked when the folder is opened, in
    tests/faults/test_faults_inputs.py) is one line naming the file. Catches a decode error without its path."""
    _make_flat(tmp_path, {"a": 2})
    bad = tmp_path / "a" / "02.png"
    bad.write_bytes(b"\x89PNG broken")
    dataset = FolderDataset(tmp_path)
    with pytest.raises(DataError) as exc:
        dataset.decode(1)
    assert str(bad) in str(exc.value) and "undecodable image" in str(exc.value) and "\n" not in str(exc.value)
    bad.unlink()
    with pytest.raises(DataError, match="02.png: cannot read image"):
        dataset.decode(1)


def test_pack_writes_an_im2rec_file_read_back_exactly(tmp_path) -> None:
    source = tmp_path / "faces"
    _make_flat(source)
    summary = pack_folder(source, tmp_path / "out", shuffle=True, seed=100)
    folder = FolderDataset(source)
    assert summary["images"] == 8 and summary["identities"] == 4 and summary["layout"] == "im2rec"
    assert (tmp_path / "out" / "property").read_text() == "4,16,16\n"
    # Independent reader: keys written in random.seed(100)-shuffle order; key = id = sorted position.
    order = list(range(8))
    random.Random(100).shuffle(order)
    records = ref_read(tmp_path / "out" / "train.rec", tmp_path / "out" / "train.idx")
    assert [key for key, _ in records] == order
    for key, payload in records:
        flag, label, id_, image = ref_unpack(payload)
        assert flag == 0 and id_ == key and label == float(folder.labels[key])
        assert image == folder.file_path(key).read_bytes()  # bytes passed through unchanged
    packed = RecordDataset(tmp_path / "out")
    assert packed.layout == "im2rec" and packed.num_classes == 4
    for index in range(8):
        assert np.array_equal(packed.decode(index), folder.decode(order[index]))


def test_pack_can_reencode_and_refuses_to_overwrite(tmp_path) -> None:
    source = tmp_path / "faces"
    _make_flat(source, {"x": 2, "y": 1})
    pack_folder(source, tmp_path / "out", quality=90, shuffle=False)
    packed = RecordDataset(tmp_path / "out")
    assert packed.labels.tolist() == [0, 0, 1]
    assert packed.encoded(0)[:2] == b"\xff\xd8"  # JPEG now
    with pytest.raises(DataError, match="already exists"):
        pack_folder(source, tmp_path / "out")


def test_pack_refuses_mixed_image_sizes_and_writes_nothing(tmp_path) -> None:
    source = tmp_path / "faces"
    _make_flat(source, {"x": 1})
    (source / "y").mkdir()
    (source / "y" / "big.jpg").write_bytes(jpeg(image_array(3, size=24)))
    with pytest.raises(DataError, match="big.jpg: image is 24x24, the first image is 16x16"):
        pack_folder(source, tmp_path / "out", shuffle=False)
    assert not (tmp_path / "out" / "train.rec").exists() and not (tmp_path / "out" / "property").exists()
