"""Distributed context and class-center sharding arithmetic shared by methods and the harness.

A method receives a :class:`DistContext` in ``from_config``; with one process it is the trivial
context (rank 0 of 1) and every collective is the identity, so the same method code runs alone or under
``torchrun``. The sharding rule is insightface's Partial FC v2 rule (partial_fc_v2.py): rank ``r`` of
``W`` owns ``C // W + (r < C % W)`` contiguous classes starting at ``C // W * r + min(r, C % W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    """Which process this is among how many (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistContext:
        """The context of the initialised default process group, or the single-process context."""
        if torch_dist.is_available() and torch_dist.is_initialized():
            return cls(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size())
        return cls()


@dataclass(frozen=True)
class ClassShard:
    """The contiguous range of class ids ``[start, start + size)`` owned by one rank."""

    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size

    def to_local(self, labels: torch.Tensor) -> torch.Tensor:
        """Map global labels to local column indices; labels owned by another rank become -1."""
        local = labels - self.start
        owned = (labels >= self.start) & (labels < self.stop)
        return torch.where(owned, local, torch.full_like(local, -1))


def class_shard(num_classes: int, world_size: int, rank: int) -> ClassShard:
    """The shard of ``num_classes`` class centers that ``rank`` owns among ``world_size`` ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(num_classes, world_size)
    return ClassShard(start=base * rank + min(rank, extra), size=base + (1 if rank < extra else 0))
