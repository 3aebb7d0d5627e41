"""insightface ``.bin`` verification packs: a restricted reader and a writer of Python 2's exact bytes.

``.bin`` layout (insightface recognition/arcface_torch/eval/verification.py ``load_bin``; the packs are
written by Python 2 with pickle protocol 2): a pickle of ``(bins, issame_list)`` where ``bins`` holds
``2P`` encoded images (py2 ``str`` of JPEG/PNG bytes, or numpy uint8 arrays from ``cv2.imencode``) and
``issame_list`` ``P`` booleans; pair ``k`` is ``(bins[2k], bins[2k+1])``. The files come from the
internet, so :func:`load_bin` unpickles with a restricted unpickler that builds only containers, bytes,
booleans, numbers and uint8/bool numpy arrays, and refuses every other global (a crafted pickle could
otherwise run any command while loading) before anything is called.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import DataError
from bench.eval.formats.images import decode_array, encode_jpeg, encode_png

_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own ndarray unpickling helper


_SAFE_DTYPES = ("u1", "b1", "uint8", "bool")


class _Refused(Exception):
    """A global the restricted unpickler will not build."""


def _dtype_name(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value)


def _safe_dtype(name: object, align: object = False, copy: object = True) -> np.dtype:
    """``numpy.dtype`` for uint8 and bool only (the entries of a ``.bin`` are uint8 encoded images)."""
    text = _dtype_name(name)
    if text not in _SAFE_DTYPES:
        raise _Refused(f"numpy.dtype({text!r})")
    return np.dtype(text)


def _safe_reconstruct(subtype: object, shape: object, dtype_code: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _Refused(f"numpy _reconstruct of {subtype!r}")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype_code)


def _safe_frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("|<>=") not in ("u1", "b1"):
        raise _Refused(f"numpy _frombuffer with dtype {dtype!r}")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=_dtype_name(order))


def _safe_scalar(dtype: object, data: object) -> np.generic:
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("|<>=") not in ("u1", "b1"):
        raise _Refused(f"numpy scalar of dtype {dtype!r}")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how Python 3 pickles ``bytes`` at protocol 2."""
    if not isinstance(text, str) or _dtype_name(encoding).replace("-", "") not in ("latin1",):
        raise _Refused(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


#: The only globals a ``.bin`` may name: numpy's array reconstruction (Python 2 and 3 module paths),
#: restricted to uint8 / bool data, and Python 3's protocol-2 bytes encoding.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle a ``.bin`` payload with only the globals in ``_ALLOWED_GLOBALS`` (Python 2 strings as bytes)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as refused:
        raise DataError(f"{source}: refused to load: the pickle asks for {refused}, which a .bin pack never "
                        f"needs and which could run code; nothing from the file was used") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: not a readable .bin pickle ({reason})") from None


def load_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 RGB ``[2P, H, W, 3]``) and ``issame`` (bool ``[P]``) of an insightface ``.bin`` pack."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: .bin file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    payload = safe_unpickle(data, str(path))
    if not isinstance(payload, (tuple, list)) or len(payload) != 2:
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(payload).__name__}")
    bins, issame_list = payload
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"{path}: bins must be a list of encoded images, got {type(bins).__name__}")
    issame = _issame_array(issame_list, path)
    if len(bins) != 2 * issame.shape[0] or issame.shape[0] == 0:
        raise DataError(f"{path}: {len(bins)} images for {issame.shape[0]} pairs; a pack holds 2 images per pair")
    images = []
    for index, entry in enumerate(bins):
        if not isinstance(entry, (bytes, bytearray, np.ndarray)):
            raise DataError(f"{path}: image {index} is a {type(entry).__name__}, not encoded image bytes")
        image = decode_array(entry, f"{path} (image {index})")
        if images and image.shape != images[0].shape:
            raise DataError(f"{path}: image {index} is {image.shape[:2]}, image 0 is "
                            f"{images[0].shape[:2]}; a pack holds images of one size")
        images.append(image)
    return np.stack(images), issame


def _issame_array(issame_list: object, path: Path) -> np.ndarray:
    if isinstance(issame_list, np.ndarray):
        values = issame_list.ravel().tolist()
    elif isinstance(issame_list, (list, tuple)):
        values = list(issame_list)
    else:
        raise DataError(f"{path}: issame_list must be a list of booleans, got {type(issame_list).__name__}")
    if not all(isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1))
               for v in values):
        raise DataError(f"{path}: issame_list must hold only booleans")
    return np.asarray(values, dtype=bool)


class _Py2Pickler:
    """The bytes CPython 2.7's ``pickle.dump(obj, f, protocol=2)`` writes for a ``.bin`` payload.

    Only what a pack holds: a tuple of two lists; py2 ``str`` (BINSTRING / SHORT_BINSTRING, memoised);
    booleans (NEWTRUE / NEWFALSE); numpy uint8 arrays as py2 numpy pickles them (``_reconstruct`` +
    ``dtype`` + BUILD with the raw data as a ``str``). Lists are emitted in batches of 1,000 appends, as
    py2's ``_batch_appends``.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.memo = 0
        self.globals: dict[tuple[str, str], int] = {}

    def put(self) -> None:
        index = self.memo
        self.memo += 1
        self.out.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def get(self, index: int) -> None:
        self.out.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))

    def string(self, data: bytes) -> None:
        if len(data) < 256:
            self.out.write(b"U" + bytes([len(data)]) + data)
        else:
            self.out.write(b"T" + struct.pack("<i", len(data)) + data)
        self.put()

    def int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out.write(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            self.out.write(b"M" + struct.pack("<H", value))
        else:
            self.out.write(b"J" + struct.pack("<i", value))

    def global_(self, module: str, name: str) -> None:
        key = (module, name)
        if key in self.globals:
            self.get(self.globals[key])
            return
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        self.globals[key] = self.memo
        self.put()

    def array(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.uint8).ravel()
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.int(0)
        self.out.write(b"\x85")                      # TUPLE1: shape (0,)
        self.put()
        self.string(b"b")
        self.out.write(b"\x87")                      # TUPLE3
        self.put()
        self.out.write(b"R")                         # REDUCE
        self.put()
        self.out.write(b"(")                         # MARK: state (1, shape, dtype, False, raw)
        self.int(1)
        self.int(array.shape[0])
        self.out.write(b"\x85")
        self.put()
        self.global_("numpy", "dtype")
        self.string(b"u1")
        self.int(0)
        self.int(1)
        self.out.write(b"\x87")
        self.put()
        self.out.write(b"R")
        self.put()
        self.out.write(b"(")
        self.int(3)
        self.string(b"|")
        self.out.write(b"NNN")
        self.out.write(b"J" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1))
        self.int(0)
        self.out.write(b"t")                         # TUPLE
        self.put()
        self.out.write(b"b")                         # BUILD dtype
        self.out.write(b"\x89")                      # False: not Fortran order
        self.string(array.tobytes())
        self.out.write(b"t")
        self.put()
        self.out.write(b"b")                         # BUILD array

    def list(self, items: Sequence[Any], emit) -> None:
        self.out.write(b"]")
        self.put()
        for start in range(0, len(items), 1000):
            batch = items[start:start + 1000]
            if len(batch) == 1:
                emit(batch[0])
                self.out.write(b"a")
            else:
                self.out.write(b"(")
                for item in batch:
                    emit(item)
                self.out.write(b"e")

    def pack(self, bins: Sequence[bytes | np.ndarray], issame: Sequence[bool]) -> bytes:
        self.out.write(b"\x80\x02")
        self.list(bins, lambda item: self.array(item) if isinstance(item, np.ndarray) else self.string(bytes(item)))
        self.list([bool(v) for v in issame], lambda flag: self.out.write(b"\x88" if flag else b"\x89"))
        self.out.write(b"\x86")                      # TUPLE2
        self.put()
        self.out.write(b".")
        return self.out.getvalue()


def encode_bin_entries(images: np.ndarray | torch.Tensor, image_format: str = "jpeg", quality: int = 95,
                       as_arrays: bool = False) -> list[bytes | np.ndarray]:
    """Encoded entries of uint8 RGB images ``[N, H, W, 3]``: bytes (py2 ``str``) or uint8 arrays (cv2.imencode)."""
    arrays = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    entries: list[bytes | np.ndarray] = []
    for image in arrays:
        data = encode_png(image) if image_format == "png" else encode_jpeg(image, quality)
        entries.append(np.frombuffer(data, dtype=np.uint8).copy() if as_arrays else data)
    return entries


def dumps_bin(entries: Sequence[bytes | np.ndarray], issame: Sequence[bool]) -> bytes:
    """The ``.bin`` bytes of ``(entries, issame)`` as Python 2's ``pickle.dump(..., protocol=2)`` writes them."""
    if len(entries) != 2 * len(issame):
        raise ValueError(f"{len(entries)} images for {len(issame)} pairs; a pack holds 2 images per pair")
    return _Py2Pickler().pack(list(entries), list(issame))


def write_bin(path: str | Path, images: np.ndarray | torch.Tensor, issame: Sequence[bool],
              image_format: str = "jpeg", quality: int = 95, as_arrays: bool = False) -> Path:
    """Write uint8 RGB images ``[2P, H, W, 3]`` and ``issame [P]`` as an insightface ``.bin`` (atomic)."""
    from bench.records import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dumps_bin(encode_bin_entries(images, image_format, quality, as_arrays), issame))
    return path
