"""Shared margin math: pure functions from cosines to margin-adjusted target logits.

Every margin-based method (ArcFace, CosFace, sub-center ArcFace, Partial FC, DCQ, SST, ...) takes
its target-logit formula from here, so two methods that claim the same margin compute it identically.
The functions hold no parameters, devices or randomness: tensors in, tensors out.

Notation: ``cos_theta`` is the cosine between a normalised embedding and a normalised class center,
``theta = arccos(cos_theta)`` in radians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.errors import ConfigError

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
    With ``easy_margin`` the margin is applied only where cos(theta) > 0, else cos(theta) (insightface's
    option, the alternative to the fallback in the same code). ``guard=False`` returns cos(theta + m)
    everywhere, as arcface_torch does since Dec 2022 (whose ``easy_margin`` is computed but unused): no
    codebase combines it with ``easy_margin``, so that combination is refused rather than one of the two
    silently ignored.
    """
    if easy_margin and not guard:
        raise ConfigError("arc_margin: easy_margin=True cannot be combined with guard=False")
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


def combined_margin(cos_theta: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """insightface's combined margin ``cos(m1 * theta + m2) - m3`` (arcface_mxnet train.py, "combined
    margin"): m1 is SphereFace's multiplicative angular margin, m2 ArcFace's additive angular margin and
    m3 CosFace's additive cosine margin. As in that code there is no guard for m1*theta + m2 > pi.

    theta is taken from a cosine clamped to +-(1 - 1e-7), so its gradient stays finite.
    """
    theta = torch.acos(cos_theta.clamp(-1.0 + _ACOS_EDGE, 1.0 - _ACOS_EDGE))
    return torch.cos(m1 * theta + m2) - m3


#: Distance from +-1 at which acos is evaluated, keeping d acos / d cos finite.
_ACOS_EDGE = 1e-7


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


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is: float16 / bfloat16 features from mixed precision
    are widened before cosines and logits, without narrowing float64 (used by tests for exactness)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cosine_matrix(embeddings: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Cosines between every embedding and every center, clamped to [-1, 1]: ``[B, C]``.

    Computed in at least float32 even under mixed precision, as insightface runs its FC layer
    (arcface_torch builds PartialFC_V2 with fp16=False): float16 cosines near 1 lose the margin.
    """
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return F.linear(F.normalize(embeddings.to(dtype), dim=1),
                        F.normalize(centers.to(dtype), dim=1)).clamp(-1.0, 1.0)


# --- margin rules: the whole logit transform of a margin softmax, shared by full FC and Partial FC ---


@dataclass(frozen=True)
class MarginRule:
    """How a margin softmax turns the cosines of one row into logits (before the scale ``s``).

    Two parts, both pure:

    - the *target* logit, :meth:`target_logit` of cos(theta_y) (elementwise, differentiable);
    - optional *hard negatives*: non-target cosines above :meth:`hard_threshold` of the row become
      ``hard_slope * cos + hard_bias`` (MV-Softmax, NPCFace). NPCFace also feeds the mean cosine of a
      row's hard negatives (no gradient) into its target margin (``needs_hard_mean``).

    :func:`apply_rule` applies a rule with autograd; ``methods.margin_softmax`` applies the same rule in
    a fused, memory-lean cross-entropy. Both read only these methods, so the math exists once.
    """

    s: float
    #: Whether the rule reweights hard negatives (then :meth:`hard_threshold` is defined).
    has_hard_negatives: ClassVar[bool] = False
    #: Whether :meth:`target_logit` needs the mean cosine of the row's hard negatives (NPCFace).
    needs_hard_mean: ClassVar[bool] = False

    @property
    def hard_slope(self) -> float:
        return 1.0

    @property
    def hard_bias(self) -> float:
        return 0.0

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def hard_threshold(self, cos_y: torch.Tensor) -> torch.Tensor | None:
        """Per-row cosine above which a negative is hard; None when the rule has no hard negatives."""
        return None


@dataclass(frozen=True)
class ArcFaceRule(MarginRule):
    """ArcFace: cos(theta_y + m) (see :func:`arc_margin`); ``straight_through`` as arcface_torch today."""

    m: float = 0.5
    easy_margin: bool = False
    guard: bool = True
    straight_through: bool = False

    def __post_init__(self) -> None:
        if self.easy_margin and not self.guard:
            # easy_margin is the old insightface alternative to the theta + m > pi fallback; fallback=False
            # (guard) reproduces arcface_torch since Dec 2022, which has no easy margin: refused at
            # construction (arc_margin refuses it too), not half-applied.
            raise ConfigError("ArcFace: easy_margin=True cannot be combined with fallback=False")

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        adjusted = arc_margin(cos_y, self.m, easy_margin=self.easy_margin, guard=self.guard)
        return straight_through(cos_y, adjusted) if self.straight_through else adjusted


@dataclass(frozen=True)
class CosFaceRule(MarginRule):
    """CosFace: cos(theta_y) - m."""

    m: float = 0.4

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        return cos_margin(cos_y, self.m)


@dataclass(frozen=True)
class CombinedRule(MarginRule):
    """insightface's combined margin cos(m1 theta_y + m2) - m3 (see :func:`combined_margin`)."""

    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        return combined_margin(cos_y, self.m1, self.m2, self.m3)


#: MV-Softmax's choices (see :class:`MVSoftmaxRule` and :mod:`methods.mv_softmax`).
MV_BASES = ("am", "arc")
MV_VARIANTS = ("adaptive", "fixed")
MV_TARGET_CONDITIONS = ("facexzoo", "positive", "always")


@dataclass(frozen=True)
class MVSoftmaxRule(MarginRule):
    """MV-Softmax (Wang et al., AAAI 2020, arXiv:1912.00833); sources of each choice in
    :mod:`methods.mv_softmax`.

    - margin ``base``: ``"am"``: f = cos(theta_y) - m; ``"arc"``: f = cos(theta_y + m) (no theta + m > pi
      guard, as both of the authors' codebases).
    - a negative k is mis-classified (hard) when cos(theta_k) > f, f computed with the margin whatever
      ``target_condition`` says;
    - hard negatives become ``(t + 1) cos(theta_k) + t`` (``variant="adaptive"``) or ``cos(theta_k) + t``
      (``variant="fixed"``);
    - the target logit is f where ``target_condition`` holds, else cos(theta_y): ``"facexzoo"``:
      cos(theta_y) > m for AM, cos(theta_y) > 0 for Arc; ``"positive"``: cos(theta_y) > 0 for both;
      ``"always"``: no condition.
    """

    m: float = 0.35
    t: float = 0.12
    base: str = "am"
    variant: str = "adaptive"
    target_condition: str = "facexzoo"
    has_hard_negatives: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for key, allowed in (("base", MV_BASES), ("variant", MV_VARIANTS),
                             ("target_condition", MV_TARGET_CONDITIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"MVSoftmax: {key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")

    @property
    def hard_slope(self) -> float:
        return self.t + 1.0 if self.variant == "adaptive" else 1.0

    @property
    def hard_bias(self) -> float:
        return self.t

    def _margined(self, cos_y: torch.Tensor) -> torch.Tensor:
        """f(m, theta_y), the margin-adjusted target cosine, everywhere."""
        return cos_margin(cos_y, self.m) if self.base == "am" else arc_margin(cos_y, self.m, guard=False)

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        margined = self._margined(cos_y)
        if self.target_condition == "always":
            return margined
        above = self.m if self.target_condition == "facexzoo" and self.base == "am" else 0.0
        return torch.where(cos_y > above, margined, cos_y)

    def hard_threshold(self, cos_y: torch.Tensor) -> torch.Tensor:
        return self._margined(cos_y)


@dataclass(frozen=True)
class NPCFaceRule(MarginRule):
    """NPCFace (Zeng, Shi et al., arXiv:2007.10172), as the authors' FaceX-Zoo head/NPCFace.py:

    - a negative is hard when cos(theta_k) > cos(theta_y + m) (no guard);
    - the positive margin is m' = m0 + m1 * (mean cosine of the row's hard negatives), m' = m0 when there
      are none, computed without gradient;
    - the target is cos(theta_y + m') where cos(theta_y) > 0, else cos(theta_y);
    - hard negatives become t * cos(theta_k) + alpha.
    """

    m: float = 0.35
    m0: float = 0.40
    m1: float = 0.20
    t: float = 1.10
    alpha: float = 0.20
    has_hard_negatives: ClassVar[bool] = True
    needs_hard_mean: ClassVar[bool] = True

    @property
    def hard_slope(self) -> float:
        return self.t

    @property
    def hard_bias(self) -> float:
        return self.alpha

    def target_logit(self, cos_y: torch.Tensor, hard_mean: torch.Tensor | None = None) -> torch.Tensor:
        mean = torch.zeros_like(cos_y) if hard_mean is None else hard_mean
        margin = (self.m0 + self.m1 * mean).detach()
        shifted = cos_y * torch.cos(margin) - sin_from_cos(cos_y) * torch.sin(margin)
        return torch.where(cos_y > 0, shifted, cos_y)

    def hard_threshold(self, cos_y: torch.Tensor) -> torch.Tensor:
        return arc_margin(cos_y, self.m, guard=False)


def hard_negative_mask(cosines: torch.Tensor, labels: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, K]``: entries above their row's threshold, except the row's target column.

    A label of -1 (the target's center lives on another rank) leaves every column a candidate.
    """
    hard = cosines > threshold.unsqueeze(1)
    has_target = labels >= 0
    rows = torch.arange(labels.shape[0], device=labels.device)
    hard[rows[has_target], labels[has_target]] = False
    return hard


def hard_negative_mean(cosines: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Mean cosine over each row's hard negatives (0 where there are none), without gradient."""
    with torch.no_grad():
        total = torch.where(hard, cosines, torch.zeros((), dtype=cosines.dtype, device=cosines.device)).sum(1)
        return total / hard.sum(1).clamp_min(1)


def apply_rule(cosines: torch.Tensor, labels: torch.Tensor, rule: MarginRule) -> torch.Tensor:
    """Scaled logits ``s * rule(cosines)`` with autograd (the plain path; see :class:`MarginRule`)."""
    cos_y = target_cosines(cosines, labels)
    hard_mean = None
    if rule.has_hard_negatives:
        hard = hard_negative_mask(cosines, labels, rule.hard_threshold(cos_y).detach())
        if rule.needs_hard_mean:
            hard_mean = hard_negative_mean(cosines, hard)
        cosines = torch.where(hard, rule.hard_slope * cosines + rule.hard_bias, cosines)
    return replace_target(cosines, labels, rule.target_logit(cos_y, hard_mean)) * rule.s
