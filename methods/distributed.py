"""Distributed context and class-center sharding arithmetic shared by methods and the harness.

A method receives a :class:`DistContext` in ``from_config``; with one process it is the trivial
context (rank 0 of 1) and every collective here is the identity, so the same method code runs alone or
under ``torchrun``.

Gradient convention (insightface partial_fc_v2.py): the harness averages the gradients of replicated
parameters over ranks (as DDP does). A model-parallel head computes the *global* loss on every rank from
all-gathered embeddings, so :func:`all_gather_with_grad` returns to each rank the sum over ranks of the
gradients of its rows, times the world size: after the harness's averaging, every parameter receives the
exact gradient of the global mean loss. The sharding rule is insightface's Partial FC v2 rule (partial_fc_v2.py): rank ``r`` of
``W`` owns ``C // W + (r < C % W)`` contiguous classes starting at ``C // W * r + min(r, C % W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    """Which process this is among how many (one process: rank 0 of 1), and the process group."""

    rank: int = 0
    world_size: int = 1
    #: The torch.distributed process group (None: the default group).
    group: Any = None

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


def all_gather(tensor: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along dim 0 in rank order; no gradient."""
    if not dist.is_distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, tensor.contiguous(), group=dist.group)
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dist: DistContext) -> torch.Tensor:
        ctx.dist, ctx.rows = dist, tensor.shape[0]
        return all_gather(tensor, dist)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dist = ctx.dist
        grad = grad.contiguous()
        # Sum the gradients every rank computed for every row (gloo has no reduce_scatter), keep ours,
        # and scale by the world size to offset the harness's averaging of replicated gradients.
        torch_dist.all_reduce(grad, group=dist.group)
        own = grad[dist.rank * ctx.rows:(dist.rank + 1) * ctx.rows]
        return own * dist.world_size, None


def all_gather_with_grad(tensor: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """:func:`all_gather` whose backward returns each rank the gradient of its own rows (see module doc)."""
    if not dist.is_distributed:
        return tensor
    return _AllGatherWithGrad.apply(tensor, dist)


def all_reduce(tensor: torch.Tensor, dist: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) across ranks; returns the tensor. Identity with one process."""
    if dist.is_distributed:
        reduce_op = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}[op]
        torch_dist.all_reduce(tensor, op=reduce_op, group=dist.group)
    return tensor


#: Rows per independently seeded block of class-center initialisation (see :func:`init_center_rows`).
INIT_BLOCK_ROWS = 65536


def init_center_rows(total_rows: int, start: int, stop: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a ``[total_rows, dim]`` N(0, std) matrix that no rank ever builds whole.

    Rows are drawn in fixed blocks of :data:`INIT_BLOCK_ROWS`, each from its own generator seeded by
    ``(seed, block)``, so a shard holds exactly the rows the single-process matrix would: results do not
    depend on the number of ranks, and no rank allocates more than its shard plus one block.
    """
    if not 0 <= start <= stop <= total_rows:
        raise ValueError(f"rows [{start}, {stop}) outside [0, {total_rows})")
    out = torch.empty(stop - start, dim)
    for block in range(start // INIT_BLOCK_ROWS, (stop - 1) // INIT_BLOCK_ROWS + 1 if stop > start else 0):
        block_start = block * INIT_BLOCK_ROWS
        block_rows = min(INIT_BLOCK_ROWS, total_rows - block_start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.empty(block_rows, dim).normal_(0.0, std, generator=generator)
        lo, hi = max(start, block_start), min(stop, block_start + block_rows)
        out[lo - start:hi - start] = values[lo - block_start:hi - block_start]
    return out


def draw_seed() -> int:
    """A seed drawn from torch's global generator (identical on every rank of a seeded run)."""
    return int(torch.randint(0, 2**31 - 1, ()).item())
