"""The common interface of datasets whose images stay encoded on disk and are decoded on demand.

A record file (:class:`bench.data.recordio.RecordDataset`) and an image folder
(:class:`bench.data.folder.FolderDataset`) both give:

- ``len(ds)``, and ``ds.labels``: the class of every image (int64), known *without decoding*, so splits
  are computed from the labels alone;
- ``ds.identity_index()``: the images of each identity;
- ``ds.encoded(i)`` (the stored bytes) and ``ds.decode(i)`` (an ``H x W x 3`` uint8 RGB array);
- ``ds.describe()`` (what ``bench data inspect`` prints) and ``ds.shard_samples()`` (one image per shard,
  what ``bench data verify`` decodes).

Image ``i`` of a dataset is called a *pool index*; a training split is a subset of pool indices. Every
error about a file (missing, corrupt, undecodable, a label that disagrees with the index) is a one-line
:class:`bench.errors.DataError` naming the file and the record. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bench.errors import DataError

log = logging.getLogger("bench.data")


def decode_image(data: bytes, where: str | Callable[[], str]) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to an ``H x W x 3`` uint8 RGB array with Pillow.

    Pillow rather than ``torchvision.io.decode_jpeg``: torchvision 0.29 marks its image IO deprecated.
    A JPEG written by cv2 from a BGR array is an ordinary JPEG (YCbCr inside), so any decoder returns RGB;
    only ``cv2.imdecode`` hands back BGR. Grayscale and palette images are converted to RGB. ``where``
    (a string, or a function making it only when needed) names the image in the error.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        location = where() if callable(where) else where
        raise DataError(f"{location}: undecodable image ({len(data)} bytes): {reason}") from None


@dataclass
class IdentityIndex:
    """The images of each identity: ``order[starts[c]:starts[c] + counts[c]]`` are the pool indices of class
    ``identities[c]`` (ascending)."""

    identities: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    order: np.ndarray

    def members(self, position: int) -> np.ndarray:
        start = int(self.starts[position])
        return self.order[start:start + int(self.counts[position])]

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> IdentityIndex:
        order = np.argsort(labels, kind="stable")
        all_counts = np.bincount(labels)
        identities = np.flatnonzero(all_counts)
        counts = all_counts[identities]
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        return cls(identities, starts, counts, order)


class EncodedDataset(ABC):
    """Images stored encoded (a .rec, a folder), with labels known up front and decoding on demand."""

    format: ClassVar[str]
    path: Path
    layout: str
    labels: np.ndarray
    num_classes: int
    #: (H, W) every image must have: from ``property`` or the first image. Decoded images are checked.
    image_size: tuple[int, int]
    #: Where :attr:`image_size` comes from, for messages (a ``property`` file, or the first image).
    image_size_origin: str = "the first image"
    #: Entries that were not images (folders only), counted and logged.
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def encoded(self, index: int) -> bytes:
        """The stored image bytes of pool image ``index``; checks the stored label where there is one."""

    @abstractmethod
    def where(self, index: int) -> str:
        """Names pool image ``index`` in messages: a file, or a record file with key and offset."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash that changes when the dataset's files change (size, modification time, index)."""

    def decode(self, index: int) -> np.ndarray:
        """Pool image ``index`` as an ``H x W x 3`` uint8 RGB array of :attr:`image_size`."""
        image = decode_image(self.encoded(index), lambda: self.where(index))
        if image.shape[:2] != self.image_size:
            raise DataError(f"{self.where(index)}: image is {image.shape[0]}x{image.shape[1]}, but this dataset's "
                            f"images are {self.image_size[0]}x{self.image_size[1]} (from {self.image_size_origin}); "
                            f"align and resize them first")
        return image

    def decode_into(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Decode pool images ``indices`` into ``out[len(indices), H, W, 3]`` (uint8)."""
        for position, index in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
            out[position] = self.decode(index)

    def identity_index(self) -> IdentityIndex:
        return IdentityIndex.from_labels(self.labels)

    def shard_samples(self, shards: int = 16) -> list[tuple[str, int]]:
        """One pool index per shard, ``(shard name, index)``: the first image of each of ``shards`` equal
        consecutive ranges (subclasses with real shards, e.g. WebFace folders, use those)."""
        bounds = np.linspace(0, len(self), num=min(shards, len(self)) + 1).astype(np.int64)[:-1]
        return [(f"images {int(start)}-", int(start)) for start in np.unique(bounds)]

    def describe(self) -> dict[str, Any]:
        """What ``bench data inspect`` prints."""
        per_identity = present_counts(self.labels)
        return {"path": str(self.path), "format": self.format, "layout": self.layout, "images": len(self),
                "identities": int(per_identity.shape[0]), "num_classes": int(self.num_classes),
                "images_per_identity": {"min": int(per_identity.min()), "median": float(np.median(per_identity)),
                                        "max": int(per_identity.max())},
                "image_size": [int(s) for s in self.image_size], "skipped_files": int(self.skipped),
                "fingerprint": self.fingerprint()}


def present_counts(labels: np.ndarray) -> np.ndarray:
    """Images per identity that has any, in identity order (``np.unique(..., return_counts=True)`` in O(n))."""
    counts = np.bincount(labels)
    return counts[counts > 0]


def file_stamp(*paths: Path) -> str:
    """A hash of the size and modification time of ``paths`` (cheap; content hashes of 100 GB are not)."""
    stamp = []
    for path in paths:
        stat = Path(path).stat()
        stamp.append([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def cached_array(name: str, beside: Path, fingerprint: str, compute: Callable[[], np.ndarray],
                 fallback_dir: Path | None) -> np.ndarray:
    """``compute()``, cached as ``<beside>.<name>.npy`` (+ ``.json`` with ``fingerprint``) next to the data,
    or under ``fallback_dir`` when the data's folder is read-only. A stale or unreadable cache is rebuilt."""
    from bench.records import atomic_write_npy, atomic_write_text

    candidates = [beside.with_name(f"{beside.name}.{name}")]
    if fallback_dir is not None:
        candidates.append(Path(fallback_dir) / "cache" / fingerprint / name)
    for stem in candidates:
        array_file, meta_file = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        try:
            if json.loads(meta_file.read_text()).get("fingerprint") == fingerprint:
                return np.load(array_file)
        except (OSError, ValueError):
            continue
    array = compute()
    for stem in candidates:
        array_file, meta_file = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
        try:
            array_file.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(array_file.parent, os.W_OK):
                continue
            atomic_write_npy(array_file, array)
            atomic_write_text(meta_file, json.dumps({"fingerprint": fingerprint, "of": str(beside)}) + "\n")
            return array
        except OSError:
            continue
    log.warning("could not cache %s of %s (folder and data root not writable); it will be recomputed", name, beside)
    return array


def integer_labels(values: np.ndarray, keys: np.ndarray, where: str) -> np.ndarray:
    """float32 labels -> int64, refusing anything that is not a non-negative integer (never a silent cast)."""
    values = np.asarray(values)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: key {int(keys[row])} has label {float(values[row])!r}, not a non-negative "
                        f"integer class id")
    return values.astype(np.int64)
