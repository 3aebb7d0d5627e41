"""Shared margin math: pure functions from cosines to margin-adjusted target logits.

Every margin-based method (ArcFace, CosFace, sub-center ArcFace, Partial FC, DCQ, SST, ...) takes
its target-logit formula from here, so two methods that claim the same margin compute it identically.
The functions hold no parameters, devices or randomness: tensors in, tensors out.

Notation: ``cos_theta`` is the cosine between a normalised embedding and a normalised class center,
``theta = arccos(cos_theta)`` in radians.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Floor for 1 - cos^2 under the square root, so that d sin(theta) / d cos(theta) stays finite at
#: cos(theta) = +-1 (an embedding identical to its center); it changes sin(theta) by at most 1e-6.
_SIN_SQUARED_FLOOR = 1e-12


def sin_from_cos(cos_theta: torch.Tensor) -> torch.Tensor:
    """sin(theta) for theta in [0, pi], from cos(theta)."""
    return torch.sqrt((1.0 - cos_theta * cos_theta).clamp_min(_SIN_SQUARED_FLOOR))


def arc_margin(cos_theta: torch.Tensor, margin_rad: float, *, easy_margin: bool = False,
               guard: bool = True) -> torch.Tensor:
    """ArcFace additive angular margin, ArcFace paper (Deng et al., CVPR 2019, arXiv:1801.07698) Eq. 3.

    Returns cos(theta + m) where theta + m <= pi. Beyond that, cos(theta + m) would rise again as theta
    grows (it is not monotonic on [0, pi]), rewarding a worse embedding; there the value is
    cos(theta) - m * sin(m), the fallback insightface used for its published models
    (arcface_torch losses.py before Dec 2022: ``where(cos > cos(pi - m), cos(theta+m), cos - sin(pi-m)*m)``).
    With ``easy_margin`` the margin is applied only where cos(theta) > 0 (insightface's option).
    ``guard=False`` returns cos(theta + m) everywhere, as arcface_torch does since Dec 2022.
    """
    cos_m, sin_m = math.cos(margin_rad), math.sin(margin_rad)
    shifted = cos_theta * cos_m - sin_from_cos(cos_theta) * sin_m
    if not guard:
        return shifted
    if easy_margin:
        return torch.where(cos_theta > 0, shifted, cos_theta)
    return torch.where(cos_theta > math.cos(math.pi - margin_rad), shifted, cos_theta - sin_m * margin_rad)


def cos_margin(cos_theta: torch.Tensor, margin: float) -> torch.Tensor:
    """CosFace additive cosine margin, CosFace paper (Wang et al., CVPR 2018, arXiv:1801.09414) Eq. 4:
    cos(theta) - m."""
    return cos_theta - margin


def straight_through(cos_theta: torch.Tensor, adjusted: torch.Tensor) -> torch.Tensor:
    """The value of ``adjusted`` with the gradient of ``cos_theta``.

    This reproduces today's insightface arcface_torch (losses.py since Dec 2022), which writes the
    margin into the logits under ``torch.no_grad``: the forward value has the margin, the backward pass
    sees the identity, as if no margin were applied.
    """
    return cos_theta + (adjusted - cos_theta).detach()


def replace_target(logits: torch.Tensor, labels: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with column ``labels[i]`` of row ``i`` replaced by ``target_logits[i]``.

    Rows whose label is negative (a target owned by another rank of a sharded head) are left unchanged,
    so each target receives its margin exactly once across ranks.
    """
    has_target = labels >= 0
    columns = labels.clamp_min(0).unsqueeze(1)
    current = logits.gather(1, columns).squeeze(1)
    values = torch.where(has_target, target_logits, current)
    return logits.scatter(1, columns, values.unsqueeze(1))


def target_cosines(cosines: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cos(theta_{y_i}) for each row (0 where the label is negative)."""
    gathered = cosines.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(labels >= 0, gathered, torch.zeros_like(gathered))


def cosine_matrix(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cosines between every embedding and every center, clamped to [-1, 1]: ``[B, C]``.

    Computed in at least float32 even under mixed precision, as insightface runs its FC layer
    (arcface_torch builds PartialFC_V2 with fp16=False): float16 cosines near 1 lose the margin.
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return F.linear(F.normalize(embeddings.to(dtype), dim=1),
                        F.normalize(centers.to(dtype), dim=1)).clamp(-1.0, 1.0)
