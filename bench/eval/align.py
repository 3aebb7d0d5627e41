"""Face alignment for IJB-style loose crops: a 5-point similarity to the ArcFace template, then a warp.

insightface's eval_ijbc.py estimates ``skimage.transform.SimilarityTransform`` from the detected five
landmarks (eye centres, nose tip, mouth corners) to the ArcFace template and warps with
``cv2.warpAffine(img, M, (112, 112), borderValue=0)``. Here the estimate is Umeyama's least-squares
similarity (S. Umeyama, "Least-squares estimation of transformation parameters between two point
patterns", IEEE TPAMI 13(4), 1991; the algorithm skimage implements), written with numpy, and the warp is
torch's ``grid_sample`` (bilinear, zeros outside the image, as cv2's INTER_LINEAR with borderValue 0).
Coordinates are pixel indices (pixel ``(row i, column j)`` sits at ``(x=j, y=i)``), cv2's convention.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: insightface's ArcFace template for 112 x 112 crops (``arcface_dst`` in ``utils/face_align.py``; eval_ijbc
#: writes it as the 96 x 112 template with x + 8): left eye, right eye, nose tip, left and right mouth corner.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
ALIGNED_SIZE = 112
#: Images warped per grid_sample call (bounds the sampling grid's memory).
WARP_CHUNK = 256


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``.

    ``src``: ``[K, 2]`` or a batch ``[N, K, 2]``; ``dst``: ``[K, 2]`` (or ``[N, K, 2]``). Returns ``[2, 3]``
    (or ``[N, 2, 3]``) float64 affines ``A`` with ``dst ~ A[:, :2] @ p + A[:, 2]``. Umeyama's eqs. (38)-(42):
    the rotation comes from the SVD of the cross-covariance, with a reflection fix when its determinant is
    negative, and the scale is ``trace(D S) / var(src)``.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    single = src.ndim == 2
    if single:
        src = src[None]
    dst = np.broadcast_to(dst, src.shape) if dst.ndim == 2 else dst
    if src.shape != dst.shape or src.shape[-1] != 2 or src.shape[-2] < 2:
        raise ValueError(f"umeyama needs matching [N, K, 2] point sets with K >= 2, got {src.shape} and {dst.shape}")
    k = src.shape[1]
    src_mean, dst_mean = src.mean(axis=1), dst.mean(axis=1)
    src_c, dst_c = src - src_mean[:, None], dst - dst_mean[:, None]
    covariance = np.einsum("nki,nkj->nij", dst_c, src_c) / k           # eq. (38): Sigma_xy
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones((src.shape[0], 2))
    sign[np.linalg.det(covariance) < 0, 1] = -1.0                        # eq. (39): S
    rotation = np.einsum("nij,nj,njk->nik", u, sign, vt)                 # eq. (40): R = U S V^T
    src_var = (src_c ** 2).sum(axis=(1, 2)) / k                          # sigma_x^2
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(src_var > 0, (singular * sign).sum(axis=1) / src_var, 0.0)  # eq. (42)
    linear = scale[:, None, None] * rotation
    shift = dst_mean - np.einsum("nij,nj->ni", linear, src_mean)         # eq. (41)
    out = np.concatenate([linear, shift[..., None]], axis=2)
    return out[0] if single else out


def warp_affine(images: torch.Tensor, affines: np.ndarray, size: int, padding: str = "zeros") -> torch.Tensor:
    """``out[n](x, y) = images[n](A_n^-1 (x, y))`` for output pixels of a ``size x size`` crop.

    ``images``: uint8 ``[N, 3, H, W]``; ``affines``: ``[N, 2, 3]`` source -> output pixel coordinates.
    Bilinear; outside the source, zeros (cv2.warpAffine with INTER_LINEAR and borderValue 0) or, with
    ``padding="border"``, the nearest edge pixel.
    """
    count = images.shape[0]
    affines = np.asarray(affines, dtype=np.float64).reshape(count, 2, 3)
    out = [_warp_chunk(images[start:start + WARP_CHUNK], affines[start:start + WARP_CHUNK], size, padding)
           for start in range(0, count, WARP_CHUNK)]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def _warp_chunk(images: torch.Tensor, affines: np.ndarray, size: int, padding: str) -> torch.Tensor:
    count, _, height, width = images.shape
    inverse = np.linalg.inv(affines[:, :, :2])                          # output pixel -> source pixel
    offset = -np.einsum("nij,nj->ni", inverse, affines[:, :, 2])
    # grid_sample works in [-1, 1] coordinates (align_corners=False): pixel u of n pixels is (2u + 1) / n - 1.
    # theta = to_source_normalised o inverse o from_output_normalised, all affine.
    half = size / 2.0
    centre = (size - 1) / 2.0
    scale = np.array([2.0 / width, 2.0 / height])
    linear = scale[None, :, None] * inverse * half
    shift = scale[None, :] * (np.einsum("nij,j->ni", inverse, np.array([centre, centre])) + offset) \
        + np.array([1.0 / width - 1.0, 1.0 / height - 1.0])[None, :]
    theta = torch.from_numpy(np.concatenate([linear, shift[..., None]], axis=2).astype(np.float32))
    grid = F.affine_grid(theta, [count, images.shape[1], size, size], align_corners=False)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return warped.round_().clamp_(0, 255).to(torch.uint8)


def align_faces(images: torch.Tensor, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> torch.Tensor:
    """Aligned ``size x size`` crops (uint8 ``[N, 3, size, size]``) of ``images`` from their 5 landmarks.

    The template is the 112 x 112 ArcFace template scaled by ``size / 112``.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2) or landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"expected landmarks [N, 5, 2] for {images.shape[0]} images, got {landmarks.shape}")
    template = ARCFACE_TEMPLATE_112 * (size / ALIGNED_SIZE)
    return warp_affine(images, umeyama(landmarks, template), size)
