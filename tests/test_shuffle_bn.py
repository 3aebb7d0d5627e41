"""Shuffling BN across ranks for momentum encoders (MoCo Sec. 3.3; DCQ / SST / MASST option ``shuffle_bn``).

With two gloo ranks, a key is the BatchNorm of its image with the statistics of the slice of the shared
permutation it landed in, not of its own rank's slice: checked against BatchNorm computed by hand from
the permutation. In one process the option changes nothing, and the methods that use it (DCQ, SST,
MASST) have it on by default, as their authors (issue 16).
"""

from __future__ import annotations

import pytest
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


MOMENTUM_METHODS = ("dcq", "sst", "masst")


def test_methods_shuffle_by_default_as_their_authors():
    """Issue 16: DCQ's authors shuffle the key batch across their 4 GPUs (``_batch_shuffle_ddp``) and
    FaceX-Zoo's SST shuffles before every gallery pass, so ``shuffle_bn`` defaults to on, and reaches every
    momentum copy (MASST: every agent, each with its own permutations). Catches a default left off, an
    option that does not reach the copy, and agents sharing one permutation stream."""
    from methods.base import METHODS
    from tests.method_helpers import build_tiny

    for name in MOMENTUM_METHODS:
        assert METHODS.get(name).defaults()["shuffle_bn"] is True
    assert build_tiny("dcq").weight_generator.shuffle_bn
    galleries = build_tiny("masst", {"num_agents": 3}).galleries
    assert all(gallery.shuffle_bn for gallery in galleries)
    assert len({int(gallery.shuffle_seed) for gallery in galleries}) == 3
    assert not build_tiny("dcq", {"shuffle_bn": False}).weight_generator.shuffle_bn


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_one_process_trains_bit_for_bit_as_without_shuffling(name):
    """In one process there is nothing to shuffle across, so the default (on) trains exactly as
    ``shuffle_bn=False`` did: three harness SGD steps on the BatchNorm backbone give the same losses and
    the same state, bit for bit, besides the shuffling buffers (the seed, and the call count that keeps the
    state independent of the number of ranks). Catches a permutation applied in one process (BatchNorm
    sums in another order), and a shuffling seed drawn from the global generator, which would move every
    later draw (the queue's initial rows)."""
    from tests.method_helpers import build_tiny, harness_sgd, train_steps, view_batch

    batches = [view_batch([0, 1, 2, 3], seed=0), view_batch([4, 5, 6, 7], seed=1), view_batch([8, 9, 10, 11], seed=2)]
    runs = {}
    for shuffle in (True, False):
        method = build_tiny(name, {"shuffle_bn": shuffle})
        runs[shuffle] = (train_steps(method, harness_sgd(method), batches), method.state_dict())
    assert runs[True][0] == runs[False][0]
    shuffled_state, plain_state = runs[True][1], runs[False][1]
    extra = {key for key in shuffled_state if key.endswith(("shuffle_seed", "shuffle_calls"))}
    assert set(shuffled_state) - extra == set(plain_state) and extra
    for key, value in plain_state.items():
        assert torch.equal(shuffled_state[key], value), key
    calls = sum(int(shuffled_state[key]) for key in extra if key.endswith("shuffle_calls"))
    assert calls == {"dcq": 3, "sst": 6, "masst": 6}[name]  # key passes: 1 per step (DCQ), 2 (SST, MASST)
