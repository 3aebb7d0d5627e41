"""Samplers: epoch coverage, class-balanced views, and determinism by batch number (exact resume)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.data.sampler import ClassBalancedBatchSampler, RandomBatchSampler
from methods.registry import ConfigError


def test_random_sampler_covers_every_image_once_per_epoch():
    sampler = RandomBatchSampler(num_images=100, batch_size=20, seed=0)
    batches = [next(iter(sampler)) for _ in range(5)]
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))
    second_epoch = np.concatenate([sampler.batch(k) for k in range(5, 10)])
    assert sorted(second_epoch.tolist()) == list(range(100))
    assert not np.array_equal(np.concatenate(batches), second_epoch)


def test_random_sampler_spans_epochs_when_batch_does_not_divide():
    sampler = RandomBatchSampler(num_images=10, batch_size=4, seed=1)
    stream = np.concatenate([sampler.batch(k) for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))


def test_resume_gives_identical_batches():
    labels = np.repeat(np.arange(40), 3)
    fresh = ClassBalancedBatchSampler(labels, batch_size=16, views_per_class=2, seed=7)
    it = iter(fresh)
    run = [next(it) for _ in range(12)]
    resumed = ClassBalancedBatchSampler(labels, batch_size=16, views_per_class=2, seed=7)
    resumed.load_state_dict({"batches_served": 5, "seed": 7, "batch_size": 16})
    it2 = iter(resumed)
    assert all(np.array_equal(next(it2), run[k]) for k in range(5, 12))


def test_class_balanced_batches_hold_k_views_of_distinct_identities():
    labels = np.concatenate([np.repeat(np.arange(30), 4), [30]])  # identity 30 has one image
    sampler = ClassBalancedBatchSampler(labels, batch_size=12, views_per_class=3, seed=0)
    seen = set()
    for number in range(40):
        batch = sampler.batch(number)
        ids = labels[batch].reshape(4, 3)
        assert np.all(ids == ids[:, :1])                  # views of one identity side by side
        assert len(np.unique(ids[:, 0])) == 4              # no identity twice in a batch
        for row, group in zip(ids[:, 0], batch.reshape(4, 3)):
            if row != 30:
                assert len(np.unique(group)) == 3          # without replacement when possible
            else:
                assert np.all(group == group[0])           # the single image reused
        seen.update(ids[:, 0].tolist())
    assert seen == set(range(31))


def test_class_balanced_sampler_errors():
    with pytest.raises(ConfigError, match="multiple of the method's views_per_class"):
        ClassBalancedBatchSampler(np.arange(10), batch_size=9, views_per_class=2, seed=0)
    with pytest.raises(ConfigError, match="needs 5 identities"):
        ClassBalancedBatchSampler(np.repeat(np.arange(3), 5), batch_size=10, views_per_class=2, seed=0)


# -- identity reuse gap and views with replacement (issue 4: SST's false-negative guard, DCQ's keys) --

def _identity_stream(sampler, labels, batches):
    views = sampler.views
    return np.concatenate([labels[sampler.batch(k)][::views] for k in range(batches)])


def _min_reuse_distance(stream):
    last, smallest = {}, None
    for position, identity in enumerate(stream.tolist()):
        if identity in last:
            distance = position - last[identity]
            smallest = distance if smallest is None else min(smallest, distance)
        last[identity] = position
    return smallest


@pytest.mark.parametrize("n, batch, gap", [(30, 8, 15), (30, 8, 29), (30, 8, 30), (31, 6, 20), (100, 32, 50)])
def test_identity_reuse_gap_holds_across_epochs_and_epochs_stay_complete(n, batch, gap):
    labels = np.repeat(np.arange(n), 2)
    sampler = ClassBalancedBatchSampler(labels, batch_size=batch, views_per_class=2, seed=3, identity_reuse_gap=gap)
    per_batch = batch // 2
    stream = _identity_stream(sampler, labels, 8 * n // per_batch)
    assert _min_reuse_distance(stream) >= gap
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    for number in range(30):
        assert len(np.unique(labels[sampler.batch(number)])) == per_batch


def test_identity_reuse_gap_is_needed_and_small_gaps_change_nothing():
    labels = np.repeat(np.arange(30), 2)
    plain = ClassBalancedBatchSampler(labels, batch_size=8, views_per_class=2, seed=3)
    assert _min_reuse_distance(_identity_stream(plain, labels, 60)) < 15  # without it, reuse comes early
    for gap in (1, 4):  # at most one batch: the plain sampler already guarantees it
        gapped = ClassBalancedBatchSampler(labels, batch_size=8, views_per_class=2, seed=3, identity_reuse_gap=gap)
        assert all(np.array_equal(plain.batch(k), gapped.batch(k)) for k in range(60))
    # The first epoch is the plain one in any case.
    gapped = ClassBalancedBatchSampler(labels, batch_size=8, views_per_class=2, seed=3, identity_reuse_gap=20)
    assert np.array_equal(_identity_stream(plain, labels, 7)[:28], _identity_stream(gapped, labels, 7)[:28])


def test_identity_reuse_gap_is_deterministic_by_batch_number():
    labels = np.repeat(np.arange(40), 2)
    fresh = ClassBalancedBatchSampler(labels, batch_size=16, views_per_class=2, seed=5, identity_reuse_gap=30)
    it = iter(fresh)
    run = [next(it) for _ in range(25)]
    resumed = ClassBalancedBatchSampler(labels, batch_size=16, views_per_class=2, seed=5, identity_reuse_gap=30)
    resumed.load_state_dict({"batches_served": 17, "seed": 5, "batch_size": 16})
    it2 = iter(resumed)
    assert all(np.array_equal(next(it2), run[k]) for k in range(17, 25))
    backwards = ClassBalancedBatchSampler(labels, batch_size=16, views_per_class=2, seed=5, identity_reuse_gap=30)
    assert all(np.array_equal(backwards.batch(k), run[k]) for k in reversed(range(25)))


def test_identity_reuse_gap_errors():
    with pytest.raises(ConfigError, match="needs 31 identities between two appearances"):
        ClassBalancedBatchSampler(np.repeat(np.arange(30), 2), batch_size=8, views_per_class=2, seed=0,
                                  identity_reuse_gap=31)


def test_views_with_replacement():
    labels = np.repeat(np.arange(20), 2)
    without = ClassBalancedBatchSampler(labels, batch_size=8, views_per_class=2, seed=0)
    assert all(len(np.unique(pair)) == 2 for k in range(20) for pair in without.batch(k).reshape(-1, 2))
    sampler = ClassBalancedBatchSampler(labels, batch_size=8, views_per_class=2, seed=0, views_with_replacement=True)
    pairs = np.concatenate([sampler.batch(k).reshape(-1, 2) for k in range(50)])
    assert np.all(labels[pairs[:, 0]] == labels[pairs[:, 1]])
    repeated = np.mean(pairs[:, 0] == pairs[:, 1])
    assert 0.35 < repeated < 0.65  # the same image twice with probability 1/2 for two images
