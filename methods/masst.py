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
- ``shuffle_bn = True``: as SST (FaceX-Zoo shuffles BN before every gallery pass), for every agent, each with
  its own permutations; nothing changes in one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from methods.base import MethodContext, register_method
from methods.params import require
from methods.sst import _STREAM_AGENT, SST, step_generator

ROTATIONS = ("sequential", "random")
UPDATES = ("active", "all")


@register_method("masst")
class MASST(SST):
    """Multi-Agent SST: a rotated stack of momentum gallery agents sharing one prototype queue."""

    #: The paper's agent count and rotation/update rules could not be read (module docstring).
    unconfirmed_defaults = ("num_agents", "rotation", "update")

    def __init__(self, backbone: nn.Module, ctx: MethodContext, *, num_agents: int = 3, rotation: str = "sequential",
                 update: str = "active", **sst_params: Any) -> None:
        super().__init__(backbone, ctx, **sst_params)
        # SST built agent 0; the others are momentum copies of the same probe, so all start equal.
        self.galleries.extend(self.new_gallery(agent) for agent in range(1, num_agents))
        self.num_agents, self.rotation, self.update_rule = num_agents, rotation, update

    @classmethod
    def check(cls, ctx: MethodContext, p: Mapping[str, Any]) -> None:
        super().check(ctx, p)
        owner = cls.owner()
        require(p["num_agents"] >= 1, f"num_agents must be >= 1, got {p['num_agents']}", owner)
        require(p["rotation"] in ROTATIONS, f"rotation must be one of {', '.join(ROTATIONS)}, got {p['rotation']!r}",
                owner)
        require(p["update"] in UPDATES, f"update must be one of {', '.join(UPDATES)}, got {p['update']!r}", owner)

    def active_agent(self) -> int:
        step = int(self.steps)
        if self.rotation == "sequential":
            return step % self.num_agents
        generator = step_generator(int(self.rng_seed), _STREAM_AGENT, step)
        return int(torch.randint(self.num_agents, (), generator=generator))

    def agents_to_update(self, active: int) -> list[int]:
        return [active] if self.update_rule == "active" else list(range(self.num_agents))
