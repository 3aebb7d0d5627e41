"""Shuffling BN across ranks for momentum encoders (MoCo Sec. 3.3; DCQ / SST / MASST option ``shuffle_bn``).

With two gloo ranks, a key is the BatchNorm of its image with the statistics of the slice of the shared
permutation it landed in, not of its own rank's slice: checked against BatchNorm computed by hand from
the permutation. In one process the option changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.base import MethodContext
from methods.distributed import DistContext
from methods.momentum import MomentumEncoder

LOCAL = 3  # images per rank
DIM = 4


def _images(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + rank)
    return torch.randn(LOCAL, DIM, generator=generator) * (1 + rank) + 3 * rank  # ranks differ in statistics


def _encoder() -> nn.Module:
    return nn.BatchNorm1d(DIM, affine=False)


def _keys_on_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    dist = DistContext.current()
    torch.manual_seed(0)  # the same shuffle seed on every rank, as the harness builds models
    shuffled = MomentumEncoder(_encoder(), 0.999, shuffle_bn=True, dist=dist).train()
    plain = MomentumEncoder(_encoder(), 0.999, dist=dist).train()
    images = _images(rank)
    return {"shuffled": shuffled(images), "plain": plain(images), "seed": shuffled.shuffle_seed.clone(),
            "calls": shuffled.shuffle_calls.clone()}


def _batchnorm(rows: torch.Tensor) -> torch.Tensor:
    mean = rows.mean(dim=0)
    var = ((rows - mean) ** 2).mean(dim=0)  # biased variance, as BatchNorm normalises in train mode
    return (rows - mean) / torch.sqrt(var + 1e-5)


def test_keys_use_the_statistics_of_their_shuffled_slice(tmp_path):
    from tests.dist_helpers import run_ranks

    results = run_ranks(_keys_on_rank, 2, tmp_path)
    everything = torch.cat([_images(0), _images(1)])
    seed = int(results[0]["seed"])
    assert int(results[1]["seed"]) == seed and int(results[0]["calls"]) == 1
    order = torch.randperm(2 * LOCAL, generator=torch.Generator().manual_seed(seed))
    expected = torch.empty_like(everything)
    for part in range(2):
        members = order[part * LOCAL:(part + 1) * LOCAL]
        expected[members] = _batchnorm(everything[members])
    shuffled = torch.cat([results[0]["shuffled"], results[1]["shuffled"]])
    torch.testing.assert_close(shuffled, expected, rtol=1e-5, atol=1e-5)
    # Without shuffling each rank normalises with its own slice's statistics, which differ here.
    plain = torch.cat([results[0]["plain"], results[1]["plain"]])
    torch.testing.assert_close(plain, torch.cat([_batchnorm(_images(0)), _batchnorm(_images(1))]), rtol=1e-5, atol=1e-5)
    same_partition = set(order[:LOCAL].tolist()) in ({0, 1, 2}, {3, 4, 5})
    assert torch.allclose(shuffled, plain, atol=1e-5) == same_partition


def test_one_process_is_unchanged():
    torch.manual_seed(0)
    images = torch.randn(6, DIM)
    shuffled = MomentumEncoder(_encoder(), 0.999, shuffle_bn=True).train()
    plain = MomentumEncoder(_encoder(), 0.999).train()
    assert torch.equal(shuffled(images), plain(images))


def test_methods_expose_the_option():
    from methods.base import METHODS

    for name in ("dcq", "sst", "masst"):
        assert METHODS.get(name).defaults()["shuffle_bn"] is False
    from methods.dcq import DCQ

    method = DCQ.from_config(nn.Flatten(), MethodContext(num_classes=10, embedding_size=12, global_batch_size=4),
                             {"shuffle_bn": True})
    assert method.weight_generator.shuffle_bn
