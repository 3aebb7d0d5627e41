"""MXNet RecordIO (``train.rec`` / ``train.idx`` / ``property``) read and written in plain Python + NumPy.

We do not import mxnet: the project is retired (Apache attic), its last wheels (1.9.1) break with
NumPy >= 1.24 and pull in ~100 MB for what is 60 lines of byte framing. The format below was checked
byte for byte against mxnet 1.9.1 (``/work/shared/reference/eval_formats.md`` §1; dmlc-core
``include/dmlc/recordio.h`` at HEAD, *not* the obsolete 0x3ed7230a prototype the search index serves).

Framing (little-endian). A logical record is one or more parts::

    part  := MAGIC(u32 0xced7230a) LREC(u32) DATA[len] zero padding to a multiple of 4
    LREC  := cflag << 29 | len          cflag: 0 whole, 1 first, 2 middle, 3 last part

The writer ends a part wherever the magic occurs at a 4-byte-aligned offset of the payload, drops those
four bytes, and the reader puts them back between parts; so a payload can hold any bytes. ``.idx`` is a
text file of ``key\\toffset`` lines in write order; the offset is that of the record's first magic.

Payload (mxnet ``recordio.pack``): ``IRHeader = <IfQQ`` (flag u32, label f32, id u64, id2 u64; 24
bytes). When ``flag > 0`` the label is an array: ``flag`` float32 values follow the header, and the
header's own label slot is 0. The image bytes (a JPEG made by cv2 from a BGR array, i.e. a normal JPEG
that decodes to RGB) come last.

Two dataset layouts exist (insightface's ``MXFaceDataset`` tells them apart by key 0):

- insightface (MS1MV2/V3, Glint360K, CASIA ``faces_webface_112x112``): keys ``1..N`` are images grouped
  by identity with label ``[class, 1.0]`` (face2rec2) or scalar (RecBuilder); keys ``N+1..N+C`` are one
  empty record per identity with label ``[start, end)``; key 0, written last, has flag 2, an empty
  payload and label ``[N+1, N+1+C]``.
- im2rec / shuffled (WebFace packs, what DALI reads): no header record, every label a scalar.

Labels and ranges are float32, exact only up to 2**24 = 16,777,216 (Glint360K has 17.1M images): see
:data:`FLOAT32_EXACT_LIMIT` and how :mod:`bench.data.real` avoids trusting inexact values.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from bench.data.encoded import EncodedDataset, cached_array, decode_image, file_stamp, integer_labels, log
from bench.errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
#: Low 29 bits of LREC are the part length, the high 3 bits the continuation flag.
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3
FRAME_HEADER = struct.Struct("<II")
#: Bytes read at a record's offset at once (a 112 x 112 JPEG at quality 95 is about 4-6 KiB).
READ_AHEAD = 16384
IR_HEADER = struct.Struct("<IfQQ")
#: Integers above this are not all representable in float32 (2**24 + 1 rounds to 2**24).
FLOAT32_EXACT_LIMIT = 2**24


@dataclass(frozen=True)
class IRHeader:
    """mxnet's record header. ``label`` is a float (flag 0) or a float32 array of ``flag`` values."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int

    @property
    def class_label(self) -> float:
        """The class label as insightface reads it: the scalar, or the first value of an array label."""
        return float(self.label[0]) if isinstance(self.label, np.ndarray) else float(self.label)


# ---------------------------------------------------------------------------------------------------
# Payloads (IRHeader + label array + image bytes)


def pack_payload(label: float | Iterable[float], image: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """mxnet ``recordio.pack``: a number gives flag 0; a sequence gives flag = its length, values appended."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IR_HEADER.pack(0, float(label), id, id2) + bytes(image)
    values = np.asarray(list(label) if not isinstance(label, np.ndarray) else label, dtype="<f4").ravel()
    return IR_HEADER.pack(values.size, 0.0, id, id2) + values.tobytes() + bytes(image)


def unpack_payload(payload: bytes, where: str | Callable[[], str] = "record") -> tuple[IRHeader, bytes]:
    """mxnet ``recordio.unpack``: the header and the image bytes; ``where`` (or a function making it) names
    the record in errors."""
    if len(payload) < IR_HEADER.size:
        raise DataError(f"{_text(where)}: payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    if flag == 0:
        return IRHeader(0, float(label), id_, id2), bytes(payload[IR_HEADER.size:])
    end = IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise DataError(f"{_text(where)}: IRHeader announces {flag} label values but the payload has only "
                        f"{len(payload)} bytes")
    values = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER.size).copy()
    return IRHeader(flag, values, id_, id2), bytes(payload[end:])


def _text(where: str | Callable[[], str]) -> str:
    return where() if callable(where) else where


# ---------------------------------------------------------------------------------------------------
# Framing


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record: parts split at 4-byte-aligned magics, the last part padded."""
    if len(payload) > LENGTH_MASK:
        raise ValueError(f"a RecordIO payload holds at most {LENGTH_MASK} bytes, got {len(payload)}")
    out = bytearray()
    view = memoryview(payload)
    start, split = 0, False
    position = payload.find(MAGIC_BYTES)
    aligned_end = len(payload) // 4 * 4
    while 0 <= position < aligned_end:
        if position % 4 == 0:
            out += FRAME_HEADER.pack(MAGIC, (CFLAG_MIDDLE if split else CFLAG_FIRST) << LENGTH_BITS | (position - start))
            out += view[start:position]  # aligned and a multiple of 4 long: no padding needed
            start, split = position + 4, True
            position = payload.find(MAGIC_BYTES, start)
        else:
            position = payload.find(MAGIC_BYTES, position + 1)
    length = len(payload) - start
    out += FRAME_HEADER.pack(MAGIC, (CFLAG_LAST if split else CFLAG_WHOLE) << LENGTH_BITS | length)
    out += view[start:]
    out += b"\0" * (-length % 4)
    return bytes(out)


class RecordWriter:
    """Appends records to ``rec_path`` and writes ``key\\toffset`` lines to ``idx_path`` in write order.

    Both files are written under temporary names and renamed into place by :meth:`close`, so an
    interrupted pack never leaves a .rec/.idx pair that looks complete.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec_tmp = self.rec_path.with_name(f".{self.rec_path.name}.{os.getpid()}.tmp")
        self._idx_tmp = self.idx_path.with_name(f".{self.idx_path.name}.{os.getpid()}.tmp")
        self._rec: BinaryIO = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w", encoding="ascii", newline="\n")
        self._keys: set[int] = set()
        self.offset = 0

    def write(self, key: int, payload: bytes) -> int:
        """Write one record under ``key``; returns its byte offset."""
        if key in self._keys:
            raise ValueError(f"key {key} written twice")
        self._keys.add(key)
        data = frame_record(payload)
        offset = self.offset
        self._rec.write(data)
        self._idx.write(f"{key}\t{offset}\n")
        self.offset += len(data)
        return offset

    def close(self) -> None:
        if self._rec.closed:
            return
        self._rec.close()
        self._idx.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._rec.close()
        self._idx.close()
        self._rec_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_property(path: str | Path, num_classes: int, height: int, width: int) -> None:
    """insightface's ``property`` file: ``num_classes,H,W``."""
    Path(path).write_text(f"{num_classes},{height},{width}\n")


def read_property(path: str | Path) -> tuple[int, int, int]:
    """``(num_classes, H, W)`` from the first line of ``property`` (later lines, e.g. rec2shufrec's, ignored)."""
    path = Path(path)
    try:
        first = path.read_text(encoding="ascii", errors="replace").splitlines()[0:1]
    except FileNotFoundError:
        raise DataError(f"{path}: missing property file (one line 'num_classes,H,W', e.g. '85742,112,112')") from None
    fields = first[0].strip().split(",") if first else []
    try:
        num_classes, height, width = (int(f) for f in fields)
    except ValueError:
        raise DataError(f"{path}: first line must be 'num_classes,H,W', got {first[0] if first else ''!r}") from None
    if min(num_classes, height, width) <= 0:
        raise DataError(f"{path}: num_classes, H and W must be positive, got {first[0]!r}")
    return num_classes, height, width


# ---------------------------------------------------------------------------------------------------
# Reading


def read_index(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` as int64 arrays in file order.

    The fast path is pandas' C parser (5.8M lines in about a second); anything it rejects is re-read
    line by line to name the first bad line exactly.
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise DataError(f"{idx_path}: index file not found")
    import pandas as pd

    try:
        frame = pd.read_csv(idx_path, sep="\t", header=None, names=["key", "offset"], dtype=np.int64,
                            engine="c", comment=None, skip_blank_lines=True)
        keys, offsets = frame["key"].to_numpy(np.int64), frame["offset"].to_numpy(np.int64)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        keys, offsets = _read_index_slowly(idx_path)
    if keys.shape[0] == 0:
        raise DataError(f"{idx_path}: index file has no records")
    if (offsets < 0).any():
        row = int(np.flatnonzero(offsets < 0)[0])
        raise DataError(f"{idx_path}: key {keys[row]} has a negative offset {offsets[row]}")
    return keys, offsets


def _read_index_slowly(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    keys, offsets = [], []
    with open(idx_path, encoding="ascii", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")  # as mxnet's MXIndexedRecordIO.open
            try:
                if len(fields) != 2:
                    raise ValueError
                keys.append(int(fields[0]))
                offsets.append(int(fields[1]))
            except ValueError:
                raise DataError(f"{idx_path}: line {number} is not 'key<TAB>offset': {line.strip()[:60]!r}") from None
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class RecordFile:
    """Random access to the records of a ``.rec`` through its ``.idx``.

    Reads use ``os.pread`` on a descriptor opened lazily per process, so one instance can be shared
    with DataLoader workers (forked or pickled) without sharing a file position.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise DataError(f"{self.rec_path}: record file not found")
        self.keys, self.offsets = read_index(self.idx_path)
        self.size = self.rec_path.stat().st_size
        past = self.offsets + FRAME_HEADER.size > self.size
        if past.any():
            row = int(np.flatnonzero(past)[0])
            raise DataError(f"{self.idx_path}: key {self.keys[row]} has offset {self.offsets[row]} past the end of "
                            f"{self.rec_path} ({self.size} bytes)")
        misaligned = self.offsets % 4 != 0
        if misaligned.any():
            row = int(np.flatnonzero(misaligned)[0])
            raise DataError(f"{self.idx_path}: key {self.keys[row]} has offset {self.offsets[row]}, not a multiple "
                            f"of 4 (records start 4-byte aligned)")
        self._row_lookup = _KeyLookup(self.keys)
        duplicate = self._row_lookup.duplicate()
        if duplicate is not None:
            raise DataError(f"{self.idx_path}: key {duplicate} appears more than once")
        self._fd: int | None = None
        self._fd_pid = -1

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_fd_pid"] = None, -1
        return state

    def _descriptor(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def has_key(self, key: int) -> bool:
        return self._row_lookup.row(key) >= 0

    def offset_of(self, key: int) -> int:
        row = self._row_lookup.row(int(key))
        if row < 0:
            raise DataError(f"{self.idx_path}: no record with key {key}")
        return int(self.offsets[row])

    def read(self, key: int) -> bytes:
        """The payload of the record with ``key`` (parts joined, dropped magics restored)."""
        return self.read_at(self.offset_of(key), key)

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        fd = self._descriptor()
        # Fast path: one read covers the part header and, for most face crops (4-8 KiB), the whole record.
        block = os.pread(fd, READ_AHEAD, offset)
        if len(block) >= FRAME_HEADER.size:
            magic, lrec = FRAME_HEADER.unpack_from(block)
            length = lrec & LENGTH_MASK
            if magic == MAGIC and lrec >> LENGTH_BITS == CFLAG_WHOLE and FRAME_HEADER.size + length <= len(block):
                return block[FRAME_HEADER.size:FRAME_HEADER.size + length]
        where = f"{self.rec_path}: " + (f"key {key} at offset {offset}" if key is not None else f"offset {offset}")
        parts: list[bytes] = []
        position, first = offset, True
        while True:
            head = os.pread(fd, FRAME_HEADER.size, position)
            if len(head) < FRAME_HEADER.size:
                raise DataError(f"{where}: truncated record (file ends at {self.size} bytes inside a part header)")
            magic, lrec = FRAME_HEADER.unpack(head)
            if magic != MAGIC:
                raise DataError(f"{where}: bad magic 0x{magic:08x} at byte {position} (expected 0x{MAGIC:08x}); "
                                f"the .rec is corrupt or does not match its .idx")
            cflag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            allowed = (CFLAG_WHOLE, CFLAG_FIRST) if first else (CFLAG_MIDDLE, CFLAG_LAST)
            if cflag not in allowed:
                raise DataError(f"{where}: part at byte {position} has continuation flag {cflag}, which cannot "
                                f"{'start' if first else 'continue'} a record")
            data = os.pread(fd, length, position + FRAME_HEADER.size)
            if len(data) < length:
                raise DataError(f"{where}: truncated record (part of {length} bytes at byte {position}, file ends at "
                                f"{self.size} bytes)")
            parts.append(data)
            if cflag in (CFLAG_WHOLE, CFLAG_LAST):
                return b"".join(parts)
            parts.append(MAGIC_BYTES)
            position += FRAME_HEADER.size + (length + 3) // 4 * 4
            first = False

    def header(self, key: int) -> tuple[IRHeader, bytes]:
        """The IRHeader and image bytes of the record with ``key``."""
        payload = self.read(key)
        return unpack_payload(payload, f"{self.rec_path}: key {key} at offset {self.offset_of(key)}")

    def scan_headers(self, keys: np.ndarray, chunk: int = 1 << 20,
                     on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(flag, label, empty)`` of the records with ``keys``, reading about 40 bytes per record.

        ``label`` is the float32 scalar label, or the first value of an array label (``[class, 1.0]``, or
        ``start`` of an identity record's range; the second value is returned by :meth:`scan_ranges`).
        ``empty`` is True where the record has no image bytes. Vectorised over a read-only memory map;
        the rare record whose first part is too short (a magic inside its header) is read in full.
        """
        keys = np.asarray(keys, dtype=np.int64)
        flags = np.empty(keys.shape[0], dtype=np.uint32)
        labels = np.empty(keys.shape[0], dtype=np.float32)
        empty = np.empty(keys.shape[0], dtype=bool)
        words = self._words()
        for start in range(0, keys.shape[0], chunk):
            part = slice(start, start + chunk)
            flags[part], labels[part], empty[part] = self._scan_chunk(words, keys[part], second_value=False)[:3]
            if on_chunk:
                on_chunk(min(chunk, keys.shape[0] - start))
        return flags, labels, empty

    def scan_ranges(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(flag, first, second)`` label values of (identity) records whose labels are 2-value arrays."""
        flags, first, _, second = self._scan_chunk(self._words(), np.asarray(keys, dtype=np.int64), second_value=True)
        return flags, first, second

    def _words(self) -> np.ndarray:
        return np.memmap(self.rec_path, dtype="<u4", mode="r", shape=(self.size // 4,))

    def _scan_chunk(self, words: np.ndarray, keys: np.ndarray, second_value: bool):
        rows = self._row_lookup.rows(keys)
        if (rows < 0).any():
            raise DataError(f"{self.idx_path}: no record with key {int(keys[np.flatnonzero(rows < 0)[0]])}")
        offsets = self.offsets[rows]
        base = offsets // 4
        last_word = words.shape[0] - 1
        # Words from the record start: 0 magic, 1 lrec, 2 flag, 3 label, 4-5 id, 6-7 id2, 8.. label array.
        def word(i: int) -> np.ndarray:
            return np.asarray(words[np.minimum(base + i, last_word)])

        magic, lrec, flag = word(0), word(1), word(2)
        bad = magic != MAGIC
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.rec_path}: key {keys[row]} at offset {offsets[row]}: bad magic "
                            f"0x{int(magic[row]):08x} (expected 0x{MAGIC:08x}); the .rec is corrupt or does not "
                            f"match its .idx")
        cflag, length = lrec >> LENGTH_BITS, (lrec & LENGTH_MASK).astype(np.int64)
        if ((cflag != CFLAG_WHOLE) & (cflag != CFLAG_FIRST)).any():
            row = int(np.flatnonzero((cflag != CFLAG_WHOLE) & (cflag != CFLAG_FIRST))[0])
            raise DataError(f"{self.rec_path}: key {keys[row]} at offset {offsets[row]}: continuation flag "
                            f"{int(cflag[row])} cannot start a record")
        whole = cflag == CFLAG_WHOLE
        truncated = whole & (offsets + FRAME_HEADER.size + length > self.size)
        if truncated.any():
            row = int(np.flatnonzero(truncated)[0])
            raise DataError(f"{self.rec_path}: key {keys[row]} at offset {offsets[row]}: truncated record "
                            f"({int(length[row])} bytes announced, file ends at {self.size} bytes)")
        # The first part must hold the IRHeader and all its label values; otherwise (a magic inside them, or a
        # corrupt flag or length) the record is read in full, which raises on a payload too short for its header.
        needed = IR_HEADER.size + 4 * flag.astype(np.int64)
        label = word(3).view("<f4").copy()
        first_value = word(8).view("<f4")
        label = np.where(flag > 0, first_value, label)
        second = word(9).view("<f4").copy() if second_value else None
        image_bytes = length - IR_HEADER.size - 4 * flag.astype(np.int64)
        empty = image_bytes <= 0
        slow = (~whole) | (length < needed)
        for row in np.flatnonzero(slow):
            header, image = self.header(int(keys[row]))
            flag[row] = header.flag
            label[row] = header.class_label
            empty[row] = len(image) == 0
            if second_value:
                second[row] = header.label[1] if header.flag >= 2 else np.nan
        return flag.astype(np.uint32), label.astype(np.float32), empty, second


class _KeyLookup:
    """Key -> row of the .idx, as a dense array when keys are (nearly) 0..K, else by binary search."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        low, high = int(keys.min()), int(keys.max())
        if low >= 0 and high < 2 * keys.shape[0] + 16:
            # int32 halves the table (42M keys: 170 MB instead of 340 MB).
            dtype = np.int32 if keys.shape[0] < 2**31 else np.int64
            self.dense = np.full(high + 1, -1, dtype=dtype)
            self.dense[keys] = np.arange(keys.shape[0], dtype=dtype)
            self.order = None
        else:
            self.dense = None
            self.order = np.argsort(keys, kind="stable")
            self.sorted_keys = keys[self.order]

    def duplicate(self) -> int | None:
        """A key that occurs more than once, or None."""
        if self.dense is not None:
            # A repeated key's first row was overwritten in the table.
            lost = self.dense[self.keys] != np.arange(self.keys.shape[0])
            return int(self.keys[np.flatnonzero(lost)[0]]) if lost.any() else None
        same = np.flatnonzero(self.sorted_keys[1:] == self.sorted_keys[:-1])
        return int(self.sorted_keys[same[0]]) if same.size else None

    def rows(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        if self.dense is not None:
            inside = (keys >= 0) & (keys < self.dense.shape[0])
            return np.where(inside, self.dense[np.clip(keys, 0, self.dense.shape[0] - 1)], -1).astype(np.int64)
        position = np.searchsorted(self.sorted_keys, keys)
        position = np.minimum(position, self.sorted_keys.shape[0] - 1)
        found = self.sorted_keys[position] == keys
        return np.where(found, self.order[position], -1)

    def row(self, key: int) -> int:
        if self.dense is not None:
            return int(self.dense[key]) if 0 <= key < self.dense.shape[0] else -1
        return int(self.rows(np.asarray([key]))[0])


# ---------------------------------------------------------------------------------------------------
# The dataset view: labels without decoding, layout detection, decode on demand

#: Labels of an im2rec-layout file need one pass over all record headers; it is cached beside the data.
LABELS_CACHE_VERSION = 1
#: How far (in keys) to look around key 0's float32 ``N+1`` for the image / identity-record boundary when
#: it is above 2**24 (float32 spacing is 2 up to 2**25, 4 up to 2**26, ...).
BOUNDARY_PROBE = 16


def record_files(path: str | Path) -> tuple[Path, Path, Path]:
    """``(rec, idx, property)`` of a directory holding ``train.rec``, or of a ``.rec`` file."""
    path = Path(path)
    rec = path / "train.rec" if path.is_dir() else path
    return rec, rec.with_suffix(".idx"), rec.parent / "property"


class RecordDataset(EncodedDataset):
    """A ``.rec``/``.idx`` (+ ``property``) training set in either layout (module docstring).

    Pool index ``i`` is image key ``i + 1`` in the insightface layout and the ``i``-th line of the ``.idx``
    in the im2rec layout. Labels come from the identity records (insightface layout, when exact in
    float32 and consistent) or from one vectorised pass over the record headers, cached beside the data
    (or under ``cache_root`` when that folder is read-only). Every decoded record's own label is checked
    against :attr:`labels`, so a disagreement is an error, never a silently wrong label.
    """

    format = "recordio"

    def __init__(self, path: str | Path, cache_root: Path | None = None, require_property: bool = True,
                 progress: bool = False) -> None:
        rec, idx, prop = record_files(path)
        for needed in (rec, idx):
            if not needed.is_file():
                raise DataError(f"{needed}: file not found (a RecordIO dataset needs {rec.name}, {idx.name} and "
                                f"property side by side)")
        self.path, self.property_path = rec, prop
        self.property = read_property(prop) if (require_property or prop.exists()) else None
        self.file = RecordFile(rec, idx)
        self._fingerprint = file_stamp(rec, idx)
        self._progress = progress
        self._cache_root = cache_root
        header = self._header_record()
        if header is not None:
            self.layout = "insightface"
            self.labels, self._first_key = self._insightface_labels(header), 1
            self._keys = None
        else:
            self.layout = "im2rec"
            self._keys, self._first_key = self.file.keys, 0
            self.labels = self._cached_scan(self.file.keys, "labels")
        present = int(self.labels.max()) + 1
        if self.property is not None:
            self.num_classes = self.property[0]
            self.image_size = (self.property[1], self.property[2])
            self.image_size_origin = str(prop)
            if present > self.num_classes:
                raise DataError(f"{prop}: says {self.num_classes} classes but {rec} has label {present - 1}")
        else:
            self.num_classes = present
            self.image_size = tuple(decode_image(self.encoded(0), self.where(0)).shape[:2])
        if self.num_classes > FLOAT32_EXACT_LIMIT:
            log.warning("%s: %d classes: float32 labels above 2**24 are not exact, labels may be wrong",
                        rec, self.num_classes)

    # -- layout and labels -------------------------------------------------------------------------

    def _header_record(self) -> IRHeader | None:
        """Key 0's header when it is insightface's header record (flag > 0 and an empty payload)."""
        if not self.file.has_key(0):
            return None
        header, image = self.file.header(0)
        return header if header.flag > 0 and len(image) == 0 else None

    def _insightface_labels(self, header: IRHeader) -> np.ndarray:
        where = f"{self.path}: key 0 at offset {self.file.offset_of(0)} (header record)"
        if header.flag < 2:
            raise DataError(f"{where}: label has {header.flag} value(s), expected [first identity key, end]")
        first_identity, end = float(header.label[0]), float(header.label[1])
        total = len(self.file)
        if not (1 <= first_identity <= end) or first_identity != int(first_identity) or end != int(end):
            raise DataError(f"{where}: label {header.label.tolist()} is not an identity-key range [N+1, N+1+C]")
        exact = end <= FLOAT32_EXACT_LIMIT
        if exact:
            num_images, num_ids = int(first_identity) - 1, int(end) - int(first_identity)
        else:
            log.warning("%s: %d records; float32 key ranges above 2**24 are not exact, so labels are read from "
                        "the image records instead", self.path, total)
            num_images = self._image_boundary(int(first_identity) - 1)
            num_ids = total - 1 - num_images
        low, high = int(self.file.keys.min()), int(self.file.keys.max())
        if num_images + num_ids + 1 != total or high != total - 1 or low != 0:
            raise DataError(f"{where}: header says {num_images} images and {num_ids} identities (keys "
                            f"0..{num_images + num_ids}) but {self.file.idx_path} has {total} keys from {low} to {high}")
        image_keys = np.arange(1, num_images + 1)
        if exact:
            labels = self._labels_from_identity_records(num_images, num_ids)
            if labels is not None:
                return labels
        return self._cached_scan(image_keys, "labels")

    def _labels_from_identity_records(self, num_images: int, num_ids: int) -> np.ndarray | None:
        """``repeat(class, end - start)`` when the identity records tile keys ``1..N`` in class order."""
        identity_keys = np.arange(num_images + 1, num_images + 1 + num_ids)
        flags, starts, ends = self.file.scan_ranges(identity_keys)
        problems = np.flatnonzero((flags < 2) | ~np.isfinite(starts) | ~np.isfinite(ends) | (ends < starts))
        expected_start = np.r_[1.0, ends[:-1]]
        gaps = np.flatnonzero(starts != expected_start)
        if problems.size or gaps.size or ends[-1] != num_images + 1:
            first = int(min(problems.min(initial=num_ids), gaps.min(initial=num_ids)))
            log.warning("%s: identity records do not tile the images in class order (first at key %s); "
                        "reading labels from the image records instead", self.path,
                        int(identity_keys[min(first, num_ids - 1)]))
            return None
        return np.repeat(np.arange(num_ids, dtype=np.int64), (ends - starts).astype(np.int64))

    def _image_boundary(self, approx: int) -> int:
        """The last image key N, near ``approx``: images have bytes, identity records are empty."""
        total = len(self.file)
        low, high = max(1, approx - BOUNDARY_PROBE), min(total - 1, approx + BOUNDARY_PROBE)
        keys = np.arange(low, high + 1)
        _, _, empty = self.file.scan_headers(keys)
        boundary = np.flatnonzero(empty[1:] & ~empty[:-1])
        if boundary.size != 1:
            raise DataError(f"{self.path}: cannot find where image records end near key {approx} "
                            f"(header record's float32 range is inexact and the records around it are ambiguous)")
        return int(keys[boundary[0]])

    def _cached_scan(self, keys: np.ndarray, name: str) -> np.ndarray:
        stamp = f"{self._fingerprint}:{LABELS_CACHE_VERSION}:{keys.shape[0]}"
        fingerprint = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        return cached_array(name, self.path, fingerprint, lambda: self._scan_labels(keys), self._cache_root)

    def _scan_labels(self, keys: np.ndarray) -> np.ndarray:
        from rich.progress import Progress

        with Progress(console=_stderr_console(), transient=True, disable=not self._progress) as bar:
            task = bar.add_task(f"reading labels of {self.path.name}", total=int(keys.shape[0]))
            _, values, empty = self.file.scan_headers(keys, on_chunk=lambda n: bar.advance(task, n))
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise DataError(f"{self.path}: key {int(keys[row])} at offset {self.file.offset_of(int(keys[row]))} "
                            f"holds no image bytes")
        return integer_labels(values, keys, str(self.path))

    # -- the common interface ----------------------------------------------------------------------

    def key_of(self, index: int) -> int:
        return int(self._keys[index]) if self._keys is not None else index + self._first_key

    def where(self, index: int) -> str:
        key = self.key_of(index)
        return f"{self.path}: key {key} at offset {self.file.offset_of(key)}"

    def encoded(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        key = self.key_of(index)
        offset = self.file.offset_of(key)
        header, image = unpack_payload(self.file.read_at(offset, key), lambda: self.where(index))
        if header.class_label != self.labels[index]:
            origin = "identity records" if self.layout == "insightface" else "label cache"
            raise DataError(f"{self.where(index)}: record label {header.class_label:g} disagrees with label "
                            f"{int(self.labels[index])} from the {origin}")
        if not image:
            raise DataError(f"{self.where(index)}: record holds no image bytes")
        return image

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        out = super().describe()
        out["files"] = {"rec": str(self.file.rec_path), "idx": str(self.file.idx_path),
                        "property": str(self.property_path) if self.property is not None else None}
        out["property"] = list(self.property) if self.property is not None else None
        return out


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
