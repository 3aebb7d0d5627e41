"""The harness's data + model parallelism on 2 CPU processes (gloo) against 1 process with the global batch.

For each method, two training steps of 2 ranks x batch b must give the same loss (mean over ranks) and
the same updated parameters as one process with batch 2b: backbone everywhere, class centers on each
rank's shard, queues and momentum encoders everywhere. Tolerance: 1e-10 absolute in float64.

The backbone here has no BatchNorm: BatchNorm's batch statistics are per rank by design (as in
insightface), so a BatchNorm backbone legitimately differs between 2 x b and 1 x 2b.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.config import TrainSettings
from bench.train import Trainer
from methods.base import MethodContext, build_method
from methods.distributed import DistContext, class_shard
from tests.dist_helpers import run_ranks

IMAGE, EMBEDDING, CLASSES, GLOBAL_BATCH, STEPS = 6, 8, 24, 16, 2
METHODS = {"arcface": {}, "pfc": {"sample_rate": 1.0}, "npcface": {}, "dcq": {}, "sst": {}}


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE * IMAGE, 32), nn.PReLU(32), nn.Linear(32, EMBEDDING))


def _batches(views: int):
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        identities = torch.randperm(CLASSES, generator=generator)[:GLOBAL_BATCH // views]
        labels = identities.repeat_interleave(views)
        images = torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=generator, dtype=torch.float64)
        out.append((images, labels))
    return out


def _train(name: str, dist: DistContext):
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    ctx = MethodContext(CLASSES, EMBEDDING, GLOBAL_BATCH, STEPS, dist)
    method = build_method(name, _backbone(), ctx, METHODS[name])
    settings = TrainSettings(batch_size=GLOBAL_BATCH, budget=GLOBAL_BATCH * STEPS, warmup_fraction=0.0,
                             embedding_size=EMBEDDING)
    trainer = Trainer(method, settings, torch.device("cpu"), total_steps=STEPS, dist=dist)
    share = GLOBAL_BATCH // dist.world_size
    losses = []
    for images, labels in _batches(method.batch_spec.views_per_class):
        rows = slice(dist.rank * share, (dist.rank + 1) * share)
        loss = trainer.step(images[rows], labels[rows])
        losses.append(loss)
    from bench.distributed import mean_over_ranks

    return {"losses": [float(mean_over_ranks(l, dist)) for l in losses],
            "state": {k: v.detach().clone() for k, v in method.state_dict().items() if torch.is_tensor(v)},
            "sharded": method.sharded_state_keys()}


def _rank(rank: int, world_size: int, name: str):
    return _train(name, DistContext(rank, world_size))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_ranks_train_like_one_process(name, tmp_path):
    try:
        single = _train(name, DistContext())
    finally:
        torch.set_default_dtype(torch.float32)
    ranks = run_ranks(_rank, 2, tmp_path, name)
    for rank, result in enumerate(ranks):
        assert result["losses"] == pytest.approx(single["losses"], abs=1e-10, rel=1e-10)
        for key, value in single["state"].items():
            got = result["state"][key]
            if key in result["sharded"]:
                shard = class_shard(CLASSES, 2, rank)
                per_class = value.shape[0] // CLASSES
                value = value[shard.start * per_class:shard.stop * per_class]
            if value.dtype.is_floating_point:
                assert torch.allclose(got, value, atol=1e-10, rtol=0), (name, key)
            else:
                assert torch.equal(got, value), (name, key)
