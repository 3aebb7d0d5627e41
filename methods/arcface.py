"""The baselines: ArcFace, CosFace and the combined margin over a full FC layer (sub-center ArcFace, which
builds on them, is in :mod:`methods.subcenter`).

- ArcFace: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
  Recognition", CVPR 2019, arXiv:1801.07698. Eq. 3:
  ``L = -log( e^{s cos(theta_y + m)} / (e^{s cos(theta_y + m)} + sum_{j != y} e^{s cos theta_j}) )``.
  The combined margin ``cos(m1 theta_y + m2) - m3`` is the paper's Eq. 4 (Sec. 3.3, "Comparison with
  SphereFace and CosFace").
- CosFace: H. Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018,
  arXiv:1801.09414. Eq. 4 (LMCL): the target logit is ``s (cos theta_y - m)``.

Every head normalises the embeddings and the centers (``weight``), so logits are scaled cosines, and
returns the mean cross-entropy. Defaults and their sources:

- ArcFace ``s = 64``, ``m = 0.5`` rad: the ArcFace paper (Sec. 4.1) and insightface's MS1M configs
  (``margin_list=(1.0, 0.5, 0.0)``; ``s`` is hard-coded to 64 in arcface_torch train_v2.py).
- CosFace ``s = 64``, ``m = 0.4``: insightface's Glint360K / WebFace configs (``margin_list=(1.0, 0.0, 0.4)``);
  the CosFace paper itself uses m = 0.35 (insightface issue #1501). Pass ``m=0.35`` for the paper's value.
- Combined ``(m1, m2, m3) = (1.0, 0.5, 0.0)``: insightface's default ``margin_list`` (configs/base.py).
- Class centers are initialised N(0, 0.01) as in insightface's Partial FC (partial_fc_v2.py), in fixed
  row blocks (:func:`methods.distributed.init_center_rows`) so that any number of ranks holds the same
  centers.

Model parallelism (``dist`` with several ranks): each rank keeps the centers of a contiguous shard of
classes (insightface's rule), embeddings and labels are all-gathered, and the softmax runs across shards
(:mod:`methods.margin_softmax`); the loss is the global mean on every rank.

ArcFace's gradient: by default the margin is differentiated exactly, with the theta + m > pi fallback
``cos theta - m sin m`` (the form insightface used for its published models). ``grad="straight_through"``
reproduces arcface_torch since Dec 2022, which applies the margin under ``no_grad`` so the backward pass
ignores it (see :func:`methods.margins.straight_through`); that version also drops the fallback, which
``fallback=False`` reproduces. The combined margin, like insightface's MXNet code, has no such guard.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import register_head
from methods.distributed import (DistContext, all_gather, all_gather_with_grad, class_shard, draw_seed,
                                 init_center_rows)
from methods.margin_softmax import margin_softmax_cross_entropy
from methods.margins import ArcFaceRule, CombinedRule, CosFaceRule, MarginRule, apply_rule, cosine_matrix
from methods.registry import ConfigError

#: Standard deviation of the class-center initialisation (insightface partial_fc_v2.py).
CENTER_INIT_STD = 0.01


def check_scale(owner: str, s: float) -> None:
    if not s > 0:
        raise ConfigError(f"{owner}: scale s must be > 0, got {s}")


def check_sizes(owner: str, embedding_size: int, num_classes: int) -> None:
    if embedding_size < 1 or num_classes < 2:
        raise ConfigError(f"{owner}: need embedding_size >= 1 and num_classes >= 2, "
                          f"got {embedding_size} and {num_classes}")


def arcface_rule(owner: str, s: float, m: float, grad: str = "exact", easy_margin: bool = False,
                 fallback: bool = True) -> ArcFaceRule:
    check_scale(owner, s)
    if not 0.0 <= m < math.pi:
        raise ConfigError(f"{owner}: margin m must be in [0, pi) radians, got {m}")
    if grad not in ("exact", "straight_through"):
        raise ConfigError(f"{owner}: grad must be 'exact' or 'straight_through', got {grad!r}")
    return ArcFaceRule(s=float(s), m=float(m), easy_margin=bool(easy_margin), guard=bool(fallback),
                       straight_through=grad == "straight_through")


def cosface_rule(owner: str, s: float, m: float) -> CosFaceRule:
    check_scale(owner, s)
    if not 0.0 <= m < 2.0:
        raise ConfigError(f"{owner}: margin m must be in [0, 2), got {m}")
    return CosFaceRule(s=float(s), m=float(m))


class MarginHead(nn.Module):
    """A full-FC margin softmax head: ``head(embeddings, labels) -> mean cross-entropy``.

    The margin is a :class:`methods.margins.MarginRule` built by the subclass's ``rule_for`` (which takes
    the head's hyperparameters, so Partial FC can use any head's margin without its weight); the loss is
    computed by
    :func:`methods.margin_softmax.margin_softmax_cross_entropy`. ``logits`` gives the same logits through
    plain autograd (for inspection, and as a second code path in the tests).
    """

    def __init__(self, embedding_size: int, num_classes: int, rule: MarginRule, rows_per_class: int = 1,
                 dist: DistContext | None = None) -> None:
        super().__init__()
        check_sizes(type(self).__name__, embedding_size, num_classes)
        self.embedding_size, self.num_classes, self.rule = embedding_size, num_classes, rule
        self.dist = dist or DistContext()
        # Model parallel: this rank keeps the centers of its contiguous shard of classes.
        self.shard = class_shard(num_classes, self.dist.world_size, self.dist.rank)
        rows = (self.shard.start * rows_per_class, self.shard.stop * rows_per_class)
        self.weight = nn.Parameter(init_center_rows(num_classes * rows_per_class, *rows, embedding_size,
                                                    CENTER_INIT_STD, draw_seed()))

    @property
    def is_sharded(self) -> bool:
        """Whether ``weight`` holds only this rank's shard (its gradient must not be averaged)."""
        return self.dist.is_distributed

    def sharded_state_keys(self) -> list[str]:
        """State-dict entries split along dim 0 across ranks."""
        return ["weight"]

    def class_cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine of each embedding to each class, ``[B, num_classes]``."""
        return cosine_matrix(embeddings, self.weight)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``[B, num_classes]`` with the margin rule applied (plain autograd)."""
        return apply_rule(self.class_cosines(embeddings), labels, self.rule)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = all_gather_with_grad(embeddings, self.dist)
        local_labels = self.shard.to_local(all_gather(labels, self.dist))
        return margin_softmax_cross_entropy(embeddings, self.weight, local_labels, self.rule, dist=self.dist)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, rule={self.rule}"


class ArcFace(MarginHead):
    """ArcFace head: target logit ``s * cos(theta_y + m)`` (ArcFace paper Eq. 3; see module docstring)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 grad: str = "exact", easy_margin: bool = False, fallback: bool = True,
                 dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m, grad, easy_margin, fallback), dist=dist)

    @staticmethod
    def rule_for(s: float, m: float, grad: str = "exact", easy_margin: bool = False,
                 fallback: bool = True) -> ArcFaceRule:
        return arcface_rule("ArcFace", s, m, grad, easy_margin, fallback)


class CosFace(MarginHead):
    """CosFace head: target logit ``s * (cos(theta_y) - m)`` (CosFace paper Eq. 4)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4,
                 dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m), dist=dist)

    @staticmethod
    def rule_for(s: float, m: float) -> CosFaceRule:
        return cosface_rule("CosFace", s, m)


class CombinedMargin(MarginHead):
    """Combined margin head: target logit ``s * (cos(m1 theta_y + m2) - m3)`` (ArcFace paper Eq. 4)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0, dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m1, m2, m3), dist=dist)

    @staticmethod
    def rule_for(s: float, m1: float, m2: float, m3: float) -> CombinedRule:
        check_scale("CombinedMargin", s)
        if m1 <= 0 or m2 < 0 or m3 < 0:
            raise ConfigError(f"CombinedMargin: need m1 > 0, m2 >= 0, m3 >= 0, got {m1}, {m2}, {m3}")
        return CombinedRule(s=float(s), m1=float(m1), m2=float(m2), m3=float(m3))


register_head("arcface", ArcFace)
register_head("cosface", CosFace)
register_head("combined", CombinedMargin)
