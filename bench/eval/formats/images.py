"""Image files of the evaluation sets: decode, encode (Pillow, no OpenCV) and resize (torch).

Benchmark files hold RGB images once decoded (insightface decodes ``.bin`` entries with
``mx.image.imdecode``, which returns RGB; eval_ijbc converts cv2's BGR to RGB), so everything here is
RGB. Arrays follow torch's layout, uint8 ``[N, 3, H, W]``, unless a name says HWC.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import DataError


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        raise DataError("reading benchmark images needs Pillow: pip install pillow") from None
    return Image


def decode_array(data: bytes | np.ndarray, source: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB from encoded JPEG or PNG bytes; ``source`` names the file (and entry) for errors."""
    buffer = bytes(data) if isinstance(data, (bytes, bytearray)) else np.asarray(data).ravel()
    if isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8:
            raise DataError(f"{source}: not an encoded image (an array of {buffer.dtype}, expected uint8 bytes)")
        buffer = buffer.tobytes()
    if not buffer:
        raise DataError(f"{source}: empty image entry")
    image_module = _pil()
    try:
        with image_module.open(io.BytesIO(buffer)) as image:
            if image.format not in ("JPEG", "PNG"):
                raise DataError(f"{source}: {image.format} image; benchmark images are JPEG or PNG")
            return np.asarray(image.convert("RGB"))
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        if type(exc).__name__ == "UnidentifiedImageError":
            raise DataError(f"{source}: not a JPEG or PNG image") from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: cannot decode image ({reason})") from None


def decode_image(data: bytes | np.ndarray, source: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB from encoded JPEG or PNG bytes."""
    return torch.from_numpy(np.ascontiguousarray(decode_array(data, source).transpose(2, 0, 1)))


def read_array(path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB of a JPEG or PNG file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return decode_array(data, str(path))


def read_image(path: Path) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB of a JPEG or PNG file."""
    return torch.from_numpy(np.ascontiguousarray(read_array(path).transpose(2, 0, 1)))


def stack_arrays(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` from equally sized ``[H, W, 3]`` arrays.

    Stacked with numpy and converted once: thousands of tiny torch ops are slow when the CPU is shared
    (every op wakes torch's thread pool).
    """
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))


def _encode(image: torch.Tensor | np.ndarray, image_format: str, **options) -> bytes:
    """``image``: a uint8 torch ``[3, H, W]`` or numpy ``[H, W, 3]`` array."""
    array = image.permute(1, 2, 0).contiguous().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    buffer = io.BytesIO()
    _pil().fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def encode_png(image: torch.Tensor | np.ndarray) -> bytes:
    """PNG bytes (lossless) of a uint8 torch ``[3, H, W]`` or numpy ``[H, W, 3]`` image."""
    return _encode(image, "PNG", compress_level=1)


def encode_jpeg(image: torch.Tensor | np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 torch ``[3, H, W]`` or numpy ``[H, W, 3]`` image."""
    return _encode(image, "JPEG", quality=int(quality))


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 numpy ``[N, H, W, 3]`` of torch ``[N, 3, H, W]`` images, converted once for per-image encoding."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def write_image(path: Path, image: torch.Tensor, quality: int = 95) -> None:
    """Write ``image`` as PNG or JPEG, chosen by the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        data = encode_png(image)
    elif suffix in (".jpg", ".jpeg"):
        data = encode_jpeg(image, quality)
    else:
        raise ValueError(f"cannot choose an image format for {path}: use .png, .jpg or .jpeg")
    Path(path).write_bytes(data)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` resized to ``size x size`` with antialiasing (bilinear); a no-op at that size.

    Used when a benchmark's 112 x 112 crops meet a model trained at another input size (SynthFace's
    32 x 32): antialiasing avoids the aliasing a plain bilinear 3.5x downscale would add.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for start in range(0, images.shape[0], 1024):
        chunk = images[start:start + 1024].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_zeros((0, 3, size, size))
