"""Multi-Agent Semi-Siamese Training (MASST).

Y. Tai, H. Shi, D. Zeng, H. Du, Y. Hu, Z. Zhang, Z. Zhang, T. Mei, "Multi-Agent Semi-Siamese Training
for Long-tail and Shallow Face Learning", ACM TOMM 19(6), 2023, arXiv:2105.04113.

SST (:mod:`methods.sst`, all of whose semantics and defaults carry over) with a stack of ``N`` gallery
*agents*, each a momentum copy of the probe, and one shared prototype queue. The abstract: "For each
training iteration, the gallery network, which is sequentially rotated from the stack, and the probe
network form a pair of semi-siamese networks." At step ``t`` the active agent encodes ``g1, g2`` exactly
as SST's gallery does; after the optimizer step the agents chosen by ``update`` are momentum-updated.
Only the probe is used at inference. With ``N = 1`` MASST is SST step for step (tested).

The paper's code is not public, and its body (agent count, rotation and update rules, queue size) could
not be read here, so these are our documented choices, each a parameter:

- ``num_agents = 3``: our choice (the issue's default); the paper's ablation could not be checked.
- ``rotation = "sequential"``: agent ``t mod N`` at step ``t`` ("sequentially rotated"); ``"random"``
  draws the agent uniformly each step from a generator seeded by the method's seed and the step.
- ``update = "active"``: only the agent used at step ``t`` is momentum-updated after it ("that agent is
  momentum-updated after the step"), so each agent is updated every ``N``-th step and the agents differ;
  ``"all"`` updates every agent every step (then they stay identical, since they start equal, which
  makes ``N > 1`` equivalent to SST: kept for the ablation).
- ``alpha = 0.999`` per update, the queue (size rule, FIFO, coin enqueue, false-negative guard through
  the sampler), ``s``, ``m`` and ``loss_type``: as SST.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from methods.base import register_method
from methods.sst import _STREAM_AGENT, SST, _checker, step_generator

ROTATIONS = ("sequential", "random")
UPDATES = ("active", "all")


@register_method("masst")
class MASST(SST):
    """Multi-Agent SST: a rotated stack of momentum gallery agents sharing one prototype queue."""

    def __init__(self, *args: Any, num_agents: int, rotation: str, update: str, **kwargs: Any) -> None:
        super().__init__(*args, num_agents=num_agents, **kwargs)
        self.num_agents, self.rotation, self.update_rule = num_agents, rotation, update

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {**SST.defaults(), "num_agents": 3, "rotation": "sequential", "update": "active"}

    @classmethod
    def check(cls, num_classes: int, p: Mapping[str, Any]) -> None:
        super().check(num_classes, p)
        fail = _checker(cls.name)
        fail(p["num_agents"] >= 1, f"num_agents must be >= 1, got {p['num_agents']}")
        fail(p["rotation"] in ROTATIONS, f"rotation must be one of {', '.join(ROTATIONS)}, got {p['rotation']!r}")
        fail(p["update"] in UPDATES, f"update must be one of {', '.join(UPDATES)}, got {p['update']!r}")

    def active_agent(self) -> int:
        step = int(self.steps)
        if self.rotation == "sequential":
            return step % self.num_agents
        generator = step_generator(int(self.rng_seed), _STREAM_AGENT, step)
        return int(torch.randint(self.num_agents, (), generator=generator))

    def agents_to_update(self, active: int) -> list[int]:
        return [active] if self.update_rule == "active" else list(range(self.num_agents))
