"""Batched random augmentation of normalised face images for the self-supervised methods (:mod:`methods.ssl`).

One random *view* of every image of a batch ``[B, 3, H, W]`` (pixels about in [-1, 1], the loader's
normalisation), every image with its own random parameters, all of them drawn from one explicit
``torch.Generator`` so that a view is reproducible (a resumed run makes the same views). No gradient flows
through it. The pipeline is SimCLR's (T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A Simple Framework for
Contrastive Learning of Visual Representations", ICML 2020, arXiv:2002.05709, Sec. 3 and Appendix A), in its
order, with all of its amounts scaled by ONE ``strength`` in [0, 1] (ours: Huang et al., ICLR 2023,
arXiv:2111.00743, relate downstream accuracy to the concentration of augmented data, which one knob moves):

1. random resized crop (affine grid + bilinear ``grid_sample``, resized back to ``H x W``): area fraction
   uniform in ``[1 - 0.8 s, 1]`` and log aspect ratio uniform in ``[-s log(4/3), s log(4/3)]``. SimCLR:
   area in [0.08, 1], aspect in [3/4, 4/3]; the area's lower end at full strength is ours (0.2: a 0.08 crop
   of a 32 px face keeps about 9 x 9 px). A crop side longer than the image is cut to the image (ours;
   torchvision redraws), so the crop always lies inside the image;
2. horizontal flip with probability 0.5 whenever ``s > 0`` (SimCLR);
3. colour jitter with probability 0.8 (SimCLR), brightness, contrast and saturation factors uniform in
   ``[1 - 0.8 s, 1 + 0.8 s]`` and a hue shift uniform in ``[-0.2 s, 0.2 s]`` of a turn: SimCLR's colour
   distortion of strength ``s`` (its ``color_jitter(0.8s, 0.8s, 0.8s, 0.2s)``; s = 1 on ImageNet, 0.5 on
   CIFAR-10, and Huang et al.'s code uses [0.4, 0.4, 0.4, 0.1], i.e. s = 0.5). Applied in a fixed order
   (torchvision shuffles it) on pixels in [0, 1], clipped to [0, 1] after each step as torchvision does;
   the hue shift is a rotation of the chroma plane of YIQ (ours: a vectorised stand-in for the HSV hue
   shift); luma weights 0.299, 0.587, 0.114 (ITU-R BT.601, torchvision's grayscale);
4. grayscale with probability ``0.2 s`` (SimCLR: 0.2; scaled by ``s``: ours);
5. gaussian blur with probability 0.5 (SimCLR), sigma uniform in ``(0, 1.5 s]`` px for a 32 px image and
   proportionally for other sizes, separable kernel of radius ``ceil(3 sigma_max)``, reflected borders.
   SimCLR draws sigma in [0.1, 2.0] px at 224 px with a kernel of 10% of the image side (the whole range
   is below 0.3 px at 32 px); the 1.5 px at 32 px is ours.

``strength = 0`` returns the images unchanged. :class:`AugmentationStrength` holds the amounts of each
step (:meth:`AugmentationStrength.scaled` maps ``strength`` to them); :func:`apply_augmentation` takes any
amounts, e.g. a flip alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: SimCLR's aspect-ratio range of the random crop is [3/4, 4/3] (Appendix A).
MAX_LOG_ASPECT = math.log(4.0 / 3.0)
#: Lower end of the crop's area fraction at full strength is 1 - 0.8 (ours; SimCLR: 0.08).
CROP_AREA_RANGE = 0.8
#: SimCLR's colour distortion of strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s (Appendix A).
COLOUR_AMOUNT, HUE_AMOUNT = 0.8, 0.2
#: SimCLR's probabilities: flip 0.5, colour jitter 0.8, grayscale 0.2, blur 0.5 (Appendix A).
FLIP_P, JITTER_P, GRAYSCALE_P, BLUR_P = 0.5, 0.8, 0.2, 0.5
#: Largest blur sigma at full strength, in pixels of a 32 px image (ours).
MAX_SIGMA_PX, REFERENCE_SIZE = 1.5, 32
#: Luma weights (ITU-R BT.601, as torchvision's rgb_to_grayscale).
LUMA = (0.299, 0.587, 0.114)
#: RGB -> YIQ (NTSC); the hue shift rotates (I, Q).
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
#: Uniform draws per image, in this order: crop area, crop aspect, crop x, crop y, flip, jitter, brightness,
#: contrast, saturation, hue, grayscale, blur, sigma (always all drawn, so the stream does not depend on amounts).
_DRAWS = 13


@dataclass(frozen=True)
class AugmentationStrength:
    """The amounts of each augmentation step (all zero: the identity). Probabilities in [0, 1];
    ``min_area`` in (0, 1]; ``max_sigma`` in pixels of a 32 px image."""

    min_area: float = 1.0
    max_log_aspect: float = 0.0
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    max_sigma: float = 0.0

    @classmethod
    def scaled(cls, strength: float) -> AugmentationStrength:
        """SimCLR's pipeline at ``strength`` in [0, 1] (module docstring); 0 is the identity."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
        s = float(strength)
        if s == 0.0:
            return cls()
        return cls(min_area=1.0 - CROP_AREA_RANGE * s, max_log_aspect=MAX_LOG_ASPECT * s, flip_p=FLIP_P,
                   jitter_p=JITTER_P, brightness=COLOUR_AMOUNT * s, contrast=COLOUR_AMOUNT * s,
                   saturation=COLOUR_AMOUNT * s, hue=HUE_AMOUNT * s, grayscale_p=GRAYSCALE_P * s, blur_p=BLUR_P,
                   max_sigma=MAX_SIGMA_PX * s)


def augment(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image of ``images`` ``[B, 3, H, W]`` at ``strength`` in [0, 1] (module
    docstring); ``generator`` (None: torch's global one) supplies every random draw."""
    return apply_augmentation(images, AugmentationStrength.scaled(strength), generator)


def crop_theta(uniforms: torch.Tensor, amounts: AugmentationStrength) -> torch.Tensor:
    """The affine maps ``[B, 2, 3]`` (output to input coordinates in [-1, 1], as ``F.affine_grid``) of random
    resized crops, from uniforms ``[B, 4]`` in [0, 1) (area, aspect, x, y): each crop lies inside the image."""
    area = 1.0 - (1.0 - amounts.min_area) * uniforms[:, 0]
    log_aspect = (2.0 * uniforms[:, 1] - 1.0) * amounts.max_log_aspect
    width = torch.sqrt(area * torch.exp(log_aspect)).clamp(max=1.0)
    height = torch.sqrt(area * torch.exp(-log_aspect)).clamp(max=1.0)
    centre_x = (2.0 * uniforms[:, 2] - 1.0) * (1.0 - width)
    centre_y = (2.0 * uniforms[:, 3] - 1.0) * (1.0 - height)
    theta = torch.zeros(uniforms.shape[0], 2, 3, dtype=uniforms.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    return theta


@torch.no_grad()
def apply_augmentation(images: torch.Tensor, amounts: AugmentationStrength,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image ``[B, 3, H, W]`` with the given ``amounts``; steps whose amounts are
    zero are skipped, so all-zero amounts return the images unchanged. Works in float32, returns the input dtype."""
    with torch.autocast(device_type=images.device.type, enabled=False):   # float32 throughout, also under AMP
        return _apply(images, amounts, generator)


def _apply(images: torch.Tensor, amounts: AugmentationStrength, generator: torch.Generator | None) -> torch.Tensor:
    batch, _, _, width = images.shape
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, _DRAWS, generator=generator, device=device).double().cpu()
    x = images.float()
    if amounts.min_area < 1.0 or amounts.max_log_aspect > 0.0:
        theta = crop_theta(u[:, 0:4], amounts).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if amounts.flip_p > 0.0:
        x = torch.where(_mask(u[:, 4], amounts.flip_p, x), x.flip(-1), x)
    colour = (amounts.brightness, amounts.contrast, amounts.saturation, amounts.hue)
    if amounts.jitter_p > 0.0 and any(colour):
        x = torch.where(_mask(u[:, 5], amounts.jitter_p, x), _jitter(x, u[:, 6:10], amounts), x)
    if amounts.grayscale_p > 0.0:
        gray = _luma(x).expand_as(x)
        x = torch.where(_mask(u[:, 10], amounts.grayscale_p, x), gray, x)
    if amounts.blur_p > 0.0 and amounts.max_sigma > 0.0:
        scale = amounts.max_sigma * width / REFERENCE_SIZE
        sigma = (u[:, 12] * scale).clamp(min=1e-3)
        x = torch.where(_mask(u[:, 11], amounts.blur_p, x), _blur(x, sigma, scale), x)
    return images.clone() if x is images else x.to(images.dtype)


def _mask(uniform: torch.Tensor, probability: float, like: torch.Tensor) -> torch.Tensor:
    """A bool ``[B, 1, 1, 1]`` on ``like``'s device: the images a step of ``probability`` applies to."""
    return (uniform < probability).view(-1, 1, 1, 1).to(like.device)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) / 2.0


def _from_unit(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` (BT.601 weights); affine in the pixels, so the same on [0, 1] or [-1, 1] pixels."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _factor(uniform: torch.Tensor, amount: float, like: torch.Tensor) -> torch.Tensor:
    """A factor uniform in ``[max(0, 1 - amount), 1 + amount]`` per image, ``[B, 1, 1, 1]``."""
    low, high = max(0.0, 1.0 - amount), 1.0 + amount
    return (low + (high - low) * uniform).view(-1, 1, 1, 1).to(like)


def _jitter(x: torch.Tensor, u: torch.Tensor, amounts: AugmentationStrength) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, in this order, on pixels in [0, 1] clipped after each step."""
    y = _to_unit(x).clamp(0.0, 1.0)
    if amounts.brightness:
        y = (y * _factor(u[:, 0], amounts.brightness, y)).clamp(0.0, 1.0)
    if amounts.contrast:
        factor = _factor(u[:, 1], amounts.contrast, y)
        mean = _luma(y).mean(dim=(2, 3), keepdim=True)
        y = (factor * y + (1.0 - factor) * mean).clamp(0.0, 1.0)
    if amounts.saturation:
        factor = _factor(u[:, 2], amounts.saturation, y)
        y = (factor * y + (1.0 - factor) * _luma(y)).clamp(0.0, 1.0)
    if amounts.hue:
        angle = (2.0 * u[:, 3] - 1.0) * amounts.hue * 2.0 * math.pi
        y = _rotate_hue(y, angle).clamp(0.0, 1.0)
    return _from_unit(y)


def _rotate_hue(y: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of YIQ by ``angle`` ``[B]`` radians, keeping luma."""
    to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(angle.shape[0], 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = (torch.linalg.inv(to_yiq) @ rotation @ to_yiq).to(y)
    return torch.einsum("bij,bjhw->bihw", transform, y)


def _blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Gaussian blur of each image with its own ``sigma`` ``[B]`` (px), a separable depthwise convolution
    with reflected borders; kernel radius ``ceil(3 max_sigma)``, at most the image side - 1."""
    batch, channels, height, width = x.shape
    radius = max(1, min(math.ceil(3.0 * max_sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2.0 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x)
    kernel = kernel.repeat_interleave(channels, dim=0)                       # [B * C, K]
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, 2 * radius + 1),
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(-1, 1, 2 * radius + 1, 1),
                    groups=batch * channels)
    return flat.view(batch, channels, height, width)


__all__ = ["AugmentationStrength", "apply_augmentation", "augment", "crop_theta"]
