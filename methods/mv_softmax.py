"""MV-Softmax: mis-classified vector guided softmax.

X. Wang, S. Zhang, S. Wang, T. Fu, H. Shi, T. Mei, "Mis-classified Vector Guided Softmax Loss for Face
Recognition", AAAI 2020, arXiv:1912.00833. Negatives that the margin-adjusted target does not beat
(the "mis-classified vectors") are emphasised: their cosine becomes (t + 1) cos(theta_k) + t.

- AM variant (``is_am=True``, the paper's MV-AM-Softmax): hard when cos(theta_k) > cos(theta_y) - m;
  target cos(theta_y) - m where cos(theta_y) > m, else cos(theta_y).
- Arc variant (``is_am=False``, MV-Arc-Softmax): hard when cos(theta_k) > cos(theta_y + m); target
  cos(theta_y + m) where cos(theta_y) > 0, else cos(theta_y).

This is how FaceX-Zoo head/MV_Softmax.py computes it, after the authors' SV-X-Softmax fc_layers.py.
Defaults: m = 0.35 and s = 32 (FaceX-Zoo head_conf.yaml and the paper's setting); t = 0.2 as the
authors' SV-X-Softmax code. FaceX-Zoo's ``mv_weight = 1.12`` means t = 0.12 (FaceX-Zoo issue #76):
pass ``t=0.12`` to reproduce FaceX-Zoo.
"""

from __future__ import annotations

import math

from methods.arcface import MarginHead, check_scale
from methods.base import register_head
from methods.distributed import DistContext
from methods.margins import MVSoftmaxRule
from methods.registry import ConfigError


class MVSoftmax(MarginHead):
    """MV-Softmax head (see module docstring)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 32.0, m: float = 0.35, t: float = 0.2,
                 is_am: bool = True, dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m, t, is_am), dist=dist)

    @staticmethod
    def rule_for(s: float, m: float, t: float, is_am: bool) -> MVSoftmaxRule:
        check_scale("MVSoftmax", s)
        if not (0 <= m < math.pi and t >= 0):
            raise ConfigError(f"MVSoftmax: need 0 <= m < pi and t >= 0, got m={m}, t={t}")
        return MVSoftmaxRule(s=float(s), m=float(m), t=float(t), is_am=bool(is_am))

register_head("mvsoftmax", MVSoftmax)
