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
