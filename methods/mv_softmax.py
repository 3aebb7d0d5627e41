"""MV-Softmax: mis-classified vector guided softmax.

X. Wang, S. Zhang, S. Wang, T. Fu, H. Shi, T. Mei, "Mis-classified Vector Guided Softmax Loss for Face
Recognition", AAAI 2020, arXiv:1912.00833. With f(m, theta_y) the margin-adjusted target cosine, a negative
k is *mis-classified* (I_k = 1) when cos(theta_k) > f(m, theta_y), and its term in the softmax denominator
is re-weighted by h(t, theta_k, I_k)::

    L = -log( e^{s f} / (e^{s f} + sum_{k != y} h(t, theta_k, I_k) e^{s cos theta_k}) )
    fixed weight:    h = e^{s t I_k}                  -> hard negative logit  cos(theta_k) + t
    adaptive weight: h = e^{s t (cos theta_k + 1) I_k} -> hard negative logit  (t + 1) cos(theta_k) + t

Margin bases (``base``): ``"am"``, f = cos(theta_y) - m (MV-AM-Softmax); ``"arc"``, f = cos(theta_y + m)
(MV-Arc-Softmax). ``variant``: ``"adaptive"`` or ``"fixed"``. The paper reports both variants and both bases.
The equations above are the paper's as both authors' codebases implement them; the paper's text (equation
numbers, its per-variant settings of t) could not be read here and is unconfirmed.

Two codebases by the authors differ. Every default here comes from ONE of them, FaceX-Zoo
``head/MV_Softmax.py`` (JDAI-CV/FaceX-Zoo at 16b793a7564a4b9308cf94e62bdb2ffacb3a725a; same group, and the
codebase our NPCFace follows) with ``training_mode/head_conf.yaml``:

- ``s = 32``, ``m = 0.35``: head_conf.yaml ``scale: 32``, ``margin: 0.35`` (SV-X's defaults are the same).
- ``t = 0.12``: head_conf.yaml ``mv_weight: 1.12`` with hard logit ``mv_weight cos + mv_weight - 1``, i.e.
  t + 1 = 1.12 (FaceX-Zoo issue #76). The authors' SV-X code (xiaoboCASIA/SV-X-Softmax fc_layers.py) uses
  t = 0.2: pass ``t=0.2`` for it.
- ``variant = "adaptive"``: the only re-weighting FaceX-Zoo has (SV-X also runs the adaptive one; its fixed
  ``hard + t`` is a commented-out line).
- ``base = "am"``: head_conf.yaml ``is_am: 1`` (SV-X's default ``fc_type`` is ``MV-AM`` too).
- mis-classification: ``cos(theta_k) > f(m, theta_y)``, strict, with f margin-adjusted even in rows whose
  target logit carries no margin (both codebases). For Arc, f = cos(theta_y + m) is not guarded past
  theta_y + m > pi (both codebases), where it rises again.
- target logit (``target_condition = "facexzoo"``): f where cos(theta_y) > m (AM) or cos(theta_y) > 0 (Arc),
  else cos(theta_y). Arc's condition also keeps theta_y + m below pi for m < pi/2, so the target needs no
  further guard. SV-X differs: with its default ``easy_margin=True`` the margin applies where
  cos(theta_y) > 0 for both bases (``target_condition="positive"``), with ``easy_margin=False`` everywhere
  (``"always"``, Arc unguarded past pi).

Unconfirmed (parameters): ``t`` for the fixed variant (no codebase runs it; 0.12 is FaceX-Zoo's adaptive
value reused), and which ``target_condition`` the paper's runs used. Ours, in neither codebase: cosines are
clamped to [-1, 1] (as SV-X, not FaceX-Zoo's MV_Softmax.py) and sin(theta) is taken with the 1e-12 floor of
:func:`methods.margins.sin_from_cos`, so the gradient stays finite at cos = +-1.
"""

from __future__ import annotations

import math

from methods.arcface import MarginHead, check_scale
from methods.base import register_head
from methods.distributed import DistContext
from methods.margins import MVSoftmaxRule
from methods.registry import ConfigError


class MVSoftmax(MarginHead):
    """MV-Softmax head (see module docstring for the formula and the source of each default)."""

    #: FaceX-Zoo's rule is the default; which one the paper's runs used could not be confirmed.
    unconfirmed_defaults = ("target_condition",)

    def __init__(self, embedding_size: int, num_classes: int, s: float = 32.0, m: float = 0.35, t: float = 0.12,
                 variant: str = "adaptive", base: str = "am", target_condition: str = "facexzoo",
                 dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m, t, variant, base, target_condition),
                         dist=dist)

    @staticmethod
    def rule_for(s: float, m: float, t: float, variant: str = "adaptive", base: str = "am",
                 target_condition: str = "facexzoo") -> MVSoftmaxRule:
        check_scale("MVSoftmax", s)
        if not (0 <= m < math.pi and t >= 0):
            raise ConfigError(f"MVSoftmax: need 0 <= m < pi and t >= 0, got m={m}, t={t}")
        return MVSoftmaxRule(s=float(s), m=float(m), t=float(t), variant=str(variant), base=str(base),
                             target_condition=str(target_condition))


register_head("mvsoftmax", MVSoftmax)
