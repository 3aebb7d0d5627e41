"""The baselines: ArcFace and CosFace over a full fully-connected (FC) classifier.

- ArcFace: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
  Recognition", CVPR 2019, arXiv:1801.07698. Eq. 3:
  ``L = -log( e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}) )``.
- CosFace: H. Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018,
  arXiv:1801.09414. Eq. 4 (LMCL): the target logit is ``s (cos theta_y - m)``.

Both normalise the embeddings and the class centers (``weight``, shape ``[num_classes, embedding_size]``),
so the logits are scaled cosines. Defaults and their sources:

- ArcFace ``s = 64``, ``m = 0.5`` rad: the ArcFace paper's training details (Sec. 4.1) and insightface's
  MS1M configs (``margin_list=(1.0, 0.5, 0.0)``, ``s`` hard-coded to 64 in arcface_torch train_v2.py).
- CosFace ``s = 64``, ``m = 0.4``: insightface's Glint360K / WebFace configs (``margin_list=(1.0, 0.0, 0.4)``);
  the CosFace paper itself uses m = 0.35 (insightface issue #1501). Pass ``m=0.35`` for the paper's value.
- Class centers are initialised N(0, 0.01) as in insightface's Partial FC (partial_fc_v2.py).

ArcFace's gradient: by default the margin is differentiated exactly (the form insightface used for its
published models). ``grad="straight_through"`` reproduces arcface_torch since Dec 2022, which applies the
margin under ``no_grad`` so the backward pass ignores it (see :func:`methods.margins.straight_through`);
that version also drops the theta + m > pi fallback, which ``fallback=False`` reproduces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import register_head
from methods.margins import arc_margin, cos_margin, cosine_matrix, replace_target, straight_through, target_cosines
from methods.registry import ConfigError

#: Standard deviation of the class-center initialisation (insightface partial_fc_v2.py).
CENTER_INIT_STD = 0.01


class MarginHead(nn.Module):
    """A full-FC margin softmax head: ``head(embeddings, labels) -> mean cross-entropy``.

    Subclasses implement :meth:`target_logit`, the margin applied to cos(theta_y) before scaling.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ConfigError(f"{type(self).__name__}: need embedding_size >= 1 and num_classes >= 2, "
                              f"got {embedding_size} and {num_classes}")
        if not s > 0:
            raise ConfigError(f"{type(self).__name__}: scale s must be > 0, got {s}")
        self.embedding_size, self.num_classes, self.s = embedding_size, num_classes, float(s)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, CENTER_INIT_STD))

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``[B, num_classes]`` with the margin on each row's target column."""
        cosines = cosine_matrix(embeddings, self.weight)
        adjusted = replace_target(cosines, labels, self.target_logit(target_cosines(cosines, labels)))
        return adjusted * self.s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}"


class ArcFace(MarginHead):
    """ArcFace head: target logit ``s * cos(theta_y + m)`` (ArcFace paper Eq. 3; see module docstring)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 grad: str = "exact", easy_margin: bool = False, fallback: bool = True) -> None:
        super().__init__(embedding_size, num_classes, s)
        if not 0.0 <= m < math.pi:
            raise ConfigError(f"ArcFace: margin m must be in [0, pi) radians, got {m}")
        if grad not in ("exact", "straight_through"):
            raise ConfigError(f"ArcFace: grad must be 'exact' or 'straight_through', got {grad!r}")
        self.m, self.grad, self.easy_margin, self.fallback = float(m), grad, easy_margin, fallback

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        adjusted = arc_margin(cos_theta, self.m, easy_margin=self.easy_margin, guard=self.fallback)
        return straight_through(cos_theta, adjusted) if self.grad == "straight_through" else adjusted

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, grad={self.grad}"


class CosFace(MarginHead):
    """CosFace head: target logit ``s * (cos(theta_y) - m)`` (CosFace paper Eq. 4)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(embedding_size, num_classes, s)
        if not 0.0 <= m < 2.0:
            raise ConfigError(f"CosFace: margin m must be in [0, 2), got {m}")
        self.m = float(m)

    def target_logit(self, cos_theta: torch.Tensor) -> torch.Tensor:
        return cos_margin(cos_theta, self.m)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


register_head("arcface", ArcFace)
register_head("cosface", CosFace)
