"""Image-folder training sets (CASIA-WebFace, WebFace4M/12M/42M as unzipped) and packing them into RecordIO.

Two shapes are accepted, detected from the tree:

- ``root/<identity>/<image>`` (ImageFolder; WebFace260M as unzipped: ``0_0_0000000/0_0.jpg``);
- ``root/<shard>/<identity>/<image>`` (WebFace as Idiap's bob lists it, one more level of shards).

Identities are labelled ``0..C-1`` in sorted folder order, images ordered by sorted file name within an
identity: the order of torchvision's ``ImageFolder`` and of ``im2rec --list --recursive`` (``os.walk`` with
sorted dirs), so labels agree with the packs those tools make. Folders without images get no label.
Entries that are not images (by suffix, torchvision's list) are skipped and counted in the log.

File names are kept in NumPy byte-string arrays rather than Python lists: DataLoader workers fork the
dataset, and millions of Python strings would be copied page by page as their reference counts change.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.data.encoded import EncodedDataset, decode_image, file_stamp, log
from bench.data.recordio import FLOAT32_EXACT_LIMIT, RecordWriter, pack_payload, write_property
from bench.errors import DataError

#: torchvision's IMG_EXTENSIONS (what ImageFolder accepts); compared case-insensitively.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _listing(directory: str) -> tuple[list[str], list[str]]:
    """Sorted (sub-directory names, file names) of ``directory``."""
    dirs, files = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            (dirs if entry.is_dir() else files).append(entry.name)
    return sorted(dirs), sorted(files)


class FolderDataset(EncodedDataset):
    """An image folder of either shape (module docstring); labels from the folder names, no decoding."""

    format = "folder"

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: image folder not found")
        top_dirs, top_files = _listing(str(self.path))
        if not top_dirs:
            raise DataError(f"{self.path}: no identity folders (expected root/<identity>/<image> or "
                            f"root/<shard>/<identity>/<image>)")
        skipped = len(top_files)
        identities: list[str] = []
        names: list[list[str]] = []
        shards: list[tuple[str, int]] = []
        flat_example = sharded_example = None
        count = 0
        for top in top_dirs:
            sub_dirs, files = _listing(os.path.join(self.path, top))
            images = [f for f in files if is_image_name(f)]
            skipped += len(files) - len(images)
            if images:
                flat_example = flat_example or top
                identities.append(top)
                names.append(images)
                skipped += len(sub_dirs)  # folders inside an identity folder are not images
                count += len(images)
                continue
            first_of_shard = count
            for sub in sub_dirs:
                inner_dirs, inner_files = _listing(os.path.join(self.path, top, sub))
                inner_images = [f for f in inner_files if is_image_name(f)]
                skipped += len(inner_files) - len(inner_images) + len(inner_dirs)
                if inner_images:
                    sharded_example = sharded_example or f"{top}/{sub}"
                    identities.append(f"{top}/{sub}")
                    names.append(inner_images)
                    count += len(inner_images)
            if count > first_of_shard:
                shards.append((top, first_of_shard))
        if flat_example and sharded_example:
            raise DataError(f"{self.path}: mixes root/<identity>/<image> ({flat_example}) and "
                            f"root/<shard>/<identity>/<image> ({sharded_example}); use one shape")
        if not identities:
            raise DataError(f"{self.path}: no images found (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.layout = "sharded" if sharded_example else "flat"
        self.identity_dirs = np.asarray([d.encode() for d in identities], dtype=np.bytes_)
        counts = np.asarray([len(n) for n in names], dtype=np.int64)
        self.labels = np.repeat(np.arange(len(identities), dtype=np.int64), counts)
        self.file_names = np.asarray([n.encode() for group in names for n in group], dtype=np.bytes_)
        self.num_classes = len(identities)
        self.skipped = skipped
        self._shards = shards if self.layout == "sharded" else None
        if skipped:
            log.warning("%s: skipped %d entries that are not images", self.path, skipped)
        self.image_size = self._first_image_size()
        self._fingerprint = file_stamp(self.path)

    def _first_image_size(self) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        path = self.file_path(0)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: undecodable image: {(str(exc).splitlines() or [''])[0]}") from None
        return height, width

    def file_path(self, index: int) -> Path:
        directory = self.identity_dirs[self.labels[index]].decode()
        return self.path / directory / self.file_names[index].decode()

    def where(self, index: int) -> str:
        return str(self.file_path(index))

    def encoded(self, index: int) -> bytes:
        path = self.file_path(index)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None

    def fingerprint(self) -> str:
        # The root's stamp alone misses edits inside identity folders; the listing itself is hashed too.
        import hashlib

        listing = hashlib.sha256(self.identity_dirs.tobytes() + self.file_names.tobytes()).hexdigest()[:16]
        return hashlib.sha256(f"{self._fingerprint}:{listing}".encode()).hexdigest()[:16]

    def shard_samples(self, shards: int = 16) -> list[tuple[str, int]]:
        if self._shards is not None:
            return [(name, start) for name, start in self._shards]
        return super().shard_samples(shards)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._shards is not None:
            out["shards"] = len(self._shards)
        return out


def pack_folder(folder: str | Path, out_dir: str | Path, quality: int | None = None, shuffle: bool = True,
                seed: int = 100, on_image: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write ``out_dir/train.rec``, ``train.idx`` and ``property`` from an image folder, im2rec style.

    As ``im2rec --list --recursive`` then ``im2rec``: key = id = the image's position in sorted folder
    order, label = the identity's scalar float32 class, no header record; with ``shuffle`` the records are
    written in ``random.Random(seed).shuffle`` order (im2rec: ``random.seed(100); random.shuffle``).
    Image bytes are copied as they are (``quality=None``, im2rec's ``--pass-through``) or re-encoded as
    RGB JPEG at ``quality`` with Pillow. Every image must have the size of the first (written to
    ``property``); nothing is written when one does not.
    """
    from PIL import Image, UnidentifiedImageError

    dataset = FolderDataset(folder)
    out_dir = Path(out_dir)
    rec, idx, prop = out_dir / "train.rec", out_dir / "train.idx", out_dir / "property"
    existing = [str(p) for p in (rec, idx, prop) if p.exists()]
    if existing:
        raise DataError(f"{existing[0]}: already exists; pack into an empty folder (nothing is overwritten)")
    if dataset.num_classes > FLOAT32_EXACT_LIMIT:
        log.warning("%s: %d classes; float32 labels above 2**24 are not exact", folder, dataset.num_classes)
    height, width = dataset.image_size
    order = list(range(len(dataset)))
    if shuffle:
        random.Random(seed).shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    with RecordWriter(rec, idx) as writer:
        for key in order:
            data = dataset.encoded(key)
            if quality is None:
                size = _image_size(data, dataset.where(key), Image, UnidentifiedImageError)
            else:
                data, size = _reencode(decode_image(data, dataset.where(key)), quality)
            if size != (height, width):
                raise DataError(f"{dataset.where(key)}: image is {size[0]}x{size[1]}, the first image is "
                                f"{height}x{width}; a pack holds images of one size (align them first)")
            writer.write(key, pack_payload(float(dataset.labels[key]), data, id=key, id2=0))
            if on_image:
                on_image()
    write_property(prop, dataset.num_classes, height, width)
    return {"rec": str(rec), "idx": str(idx), "property": str(prop), "layout": "im2rec", "images": len(dataset),
            "identities": dataset.num_classes, "image_size": [height, width], "source_layout": dataset.layout,
            "skipped_files": dataset.skipped, "shuffled": shuffle, "seed": seed if shuffle else None,
            "reencoded_quality": quality}


def _image_size(data: bytes, where: str, image_module, unidentified) -> tuple[int, int]:
    """(H, W) from the image header only (no pixel decoding)."""
    import io

    try:
        with image_module.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.verify()  # cheap structural check; catches files that are not images at all
    except (unidentified, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: undecodable image: {(str(exc).splitlines() or [''])[0]}") from None
    return height, width


def _reencode(rgb: np.ndarray, quality: int) -> tuple[bytes, tuple[int, int]]:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), (rgb.shape[0], rgb.shape[1])
