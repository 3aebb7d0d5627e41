"""Model-parallel heads on 2 CPU processes (gloo) against one process with the whole batch.

A step of 2 ranks x batch b must give the same loss, the same embedding gradients (after the harness's
averaging: the all-gather backward returns world_size x the exact gradient) and, on each rank, the slice
of the single-process center gradient that belongs to its shard. Tolerance: 1e-10 in float64.
"""

from __future__ import annotations

import pytest
import torch

from methods.distributed import DistContext, class_shard
from methods.arcface import ArcFace
from methods.npcface import NPCFace
from methods.mv_softmax import MVSoftmax
from methods.partial_fc import PartialFC
from tests.dist_helpers import run_ranks

EMBEDDING, CLASSES, PER_RANK = 8, 23, 6
HEADS = {
    "arcface": lambda dist: ArcFace(EMBEDDING, CLASSES, dist=dist),
    "npcface": lambda dist: NPCFace(EMBEDDING, CLASSES, dist=dist),
    "mvsoftmax": lambda dist: MVSoftmax(EMBEDDING, CLASSES, dist=dist),
    "pfc-r1": lambda dist: PartialFC(EMBEDDING, CLASSES, sample_rate=1.0, dist=dist),
    "pfc-r1-dense": lambda dist: PartialFC(EMBEDDING, CLASSES, sample_rate=1.0, update="dense", dist=dist),
}


def _inputs(world_size: int):
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, CLASSES, (PER_RANK * world_size,), generator=generator)
    embeddings = torch.randn(PER_RANK * world_size, EMBEDDING, generator=generator, dtype=torch.float64)
    return embeddings, labels


def _step(name: str, dist: DistContext, embeddings: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    head = HEADS[name](dist).double()
    leaf = embeddings.clone().requires_grad_(True)
    loss = head(leaf, labels)
    loss.backward()
    center_grad = head.active_weight.grad if getattr(head, "update", "") == "sparse" else head.weight.grad
    return {"loss": loss.detach(), "embedding_grad": leaf.grad, "center_grad": center_grad,
            "weight": head.weight.detach().clone()}


def _rank_step(rank: int, world_size: int, name: str):
    torch.set_default_dtype(torch.float64)
    embeddings, labels = _inputs(world_size)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return _step(name, DistContext(rank, world_size), embeddings[rows], labels[rows])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_two_ranks_equal_one_rank_with_the_whole_batch(name, tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        embeddings, labels = _inputs(2)
        single = _step(name, DistContext(), embeddings, labels)
    finally:
        torch.set_default_dtype(torch.float32)
    ranks = run_ranks(_rank_step, 2, tmp_path, name)
    for rank, result in enumerate(ranks):
        shard = class_shard(CLASSES, 2, rank)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert torch.allclose(result["loss"], single["loss"], atol=1e-12, rtol=1e-12)
        assert torch.equal(result["weight"], single["weight"][shard.start:shard.stop])  # same init, any W
        assert torch.allclose(result["embedding_grad"] / 2, single["embedding_grad"][rows], atol=1e-10)
        assert torch.allclose(result["center_grad"], single["center_grad"][shard.start:shard.stop], atol=1e-10)


def _pfc_positive_check(rank: int, world_size: int):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(11)
    all_labels = torch.randint(0, 1000, (8 * world_size,), generator=generator)
    head = PartialFC(4, 1000, sample_rate=0.05, dist=DistContext(rank, world_size))
    local = all_labels[rank * 8:(rank + 1) * 8]
    head(torch.randn(8, 4), local).backward()
    shard = class_shard(1000, world_size, rank)
    sampled_global = (head._index + shard.start).tolist()
    owned = [int(y) for y in all_labels if shard.start <= y < shard.stop]
    return {"sampled": sampled_global, "owned_positives": owned, "expected_count": max(
        25, len(set(owned)))}


def test_partial_fc_keeps_every_positive_on_every_shard(tmp_path):
    for result in run_ranks(_pfc_positive_check, 2, tmp_path):
        assert set(result["owned_positives"]) <= set(result["sampled"])
        assert len(result["sampled"]) == result["expected_count"]
