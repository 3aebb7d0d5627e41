"""NPCFace: negative-positive collaborative margins.

D. Zeng, H. Shi, H. Du, J. Wang, Z. Lei, T. Mei, "NPCFace: Negative-Positive Collaborative Training for
Large-scale Face Recognition", arXiv:2007.10172 (v1 titled "A Negative-Positive Cooperation
Supervision..."). Hard positives and hard negatives are correlated, so the margin on a sample's target
grows with how hard its negatives are, and hard negatives are emphasised:

- hard negatives: k != y with cos(theta_k) > cos(theta_y + m);
- positive margin: m' = m0 + m1 * mean of cos(theta_k) over the row's hard negatives (m' = m0 if none),
  computed without gradient;
- target logit: cos(theta_y + m') where cos(theta_y) > 0, else cos(theta_y);
- hard negatives become t * cos(theta_k) + alpha; all logits are multiplied by s.

The formula and defaults follow the authors' implementation, FaceX-Zoo ``head/NPCFace.py``
(JDAI-CV/FaceX-Zoo at commit 16b793a7564a4b9308cf94e62bdb2ffacb3a725a): m0 = 0.40, m1 = 0.20, t = 1.10,
alpha = 0.20 are constants in its ``__init__`` (the paper's m0, m1, t, alpha; the code calls alpha ``a``);
m = 0.35 and s = 32 are that commit's ``training_mode/head_conf.yaml`` values (the class defaults there are
0.5 and 64). As in that code, the hard-negative threshold cos(theta_y + m) has no theta_y + m > pi guard
(it rises again there), and the target's cos(theta_y) > 0 condition keeps theta_y + m' below pi for
m' < pi/2. The paper's text (equation numbering, tables, its own settings) could not be read here, so the
paper is cited for the method and the code for every constant; any difference between them is unconfirmed
and resolved in the code's favour. Ours, not in that code: sin(theta) is taken with the 1e-12 floor of
:func:`methods.margins.sin_from_cos`, so the gradient stays finite at cos = +-1.
"""

from __future__ import annotations

import math

from methods.arcface import MarginHead, check_scale
from methods.base import register_head
from methods.distributed import DistContext
from methods.margins import NPCFaceRule
from methods.registry import ConfigError


class NPCFace(MarginHead):
    """NPCFace head (see module docstring for the formula and the source of each default)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 32.0, m: float = 0.35, m0: float = 0.40,
                 m1: float = 0.20, t: float = 1.10, alpha: float = 0.20, dist: DistContext | None = None) -> None:
        super().__init__(embedding_size, num_classes, self.rule_for(s, m, m0, m1, t, alpha), dist=dist)

    @staticmethod
    def rule_for(s: float, m: float, m0: float, m1: float, t: float, alpha: float) -> NPCFaceRule:
        check_scale("NPCFace", s)
        if not (0 <= m < math.pi and m0 >= 0 and t > 0):
            raise ConfigError(f"NPCFace: need 0 <= m < pi, m0 >= 0 and t > 0, got m={m}, m0={m0}, t={t}")
        return NPCFaceRule(s=float(s), m=float(m), m0=float(m0), m1=float(m1), t=float(t), alpha=float(alpha))

register_head("npcface", NPCFace)
