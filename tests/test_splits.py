"""Split recipes and statistics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from bench.config import SplitSettings
from bench.data.splits import gini, load_or_make_split, make_split, power_law_counts, split_stats
from methods.registry import UnknownNameError


def _pool(num_ids: int = 50, per_id: int = 20) -> np.ndarray:
    return np.repeat(np.arange(num_ids), per_id)


def test_gini_closed_forms():
    assert gini(np.array([3, 3, 3, 3])) == pytest.approx(0.0)
    # one of n holds everything: G = (n - 1) / n
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)
    # [1, 2, 3]: sum |xi - xj| over ordered pairs = 8; G = 8 / (2 * 9 * 2) = 2/9
    assert gini(np.array([1, 2, 3])) == pytest.approx(2 / 9)


def test_full_keeps_everything():
    labels = _pool()
    split = make_split(labels, SplitSettings(name="full"))
    assert np.array_equal(split.indices, np.arange(labels.shape[0]))
    assert split.stats["identities"] == 50 and split.stats["images"] == 1000
    assert split.stats["images_per_identity"]["histogram"] == {"20": 50}
    assert split.stats["gini"] == pytest.approx(0.0)


def test_shallow_keeps_two_distinct_images_per_identity():
    labels = np.concatenate([_pool(30, 10), np.array([30])])  # identity 30 has a single image
    split = make_split(labels, SplitSettings(name="shallow", seed=3))
    kept = labels[split.indices]
    counts = np.bincount(kept)
    assert np.all(counts[:30] == 2) and counts[30] == 1
    assert len(np.unique(split.indices)) == split.indices.shape[0]
    assert split.stats["images_per_identity"]["histogram"] == {"1": 1, "2": 30}
    assert split.recipe["images_per_identity"] == 2


def test_shallow_is_deterministic_and_seeded():
    labels = _pool()
    a = make_split(labels, SplitSettings(name="shallow", seed=1)).indices
    b = make_split(labels, SplitSettings(name="shallow", seed=1)).indices
    c = make_split(labels, SplitSettings(name="shallow", seed=2)).indices
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_longtail_follows_the_power_law_and_records_parameters():
    labels = _pool(2000, 40)
    settings = SplitSettings(name="longtail", seed=0, longtail_exponent=1.5, longtail_min_images=1)
    split = make_split(labels, settings)
    counts = np.bincount(labels[split.indices], minlength=2000)
    assert counts.min() >= 1 and counts.max() <= 40
    # P(n) ~ n^-1.5 on 1..40: P(1) = 1 / sum(n^-1.5) = 0.4337..., P(n<=2) = 0.5870...
    support = np.arange(1, 41) ** -1.5
    p1 = support[0] / support.sum()
    assert np.mean(counts == 1) == pytest.approx(p1, abs=0.035)
    assert np.mean(counts <= 2) == pytest.approx(support[:2].sum() / support.sum(), abs=0.035)
    assert split.stats["gini"] > 0.4
    assert split.recipe == {"name": "longtail", "seed": 0, "max_identities": 0,
                            "distribution": "discrete power law P(n) ~ n^-a", "exponent": 1.5, "min_images": 1}


def test_power_law_counts_bounds():
    rng = np.random.default_rng(0)
    counts = power_law_counts(10_000, 2.0, 2, 7, rng)
    assert counts.min() >= 2 and counts.max() <= 7


def test_max_identities_restricts_the_pool():
    labels = _pool(100, 5)
    split = make_split(labels, SplitSettings(name="full", max_identities=10))
    assert split.stats["identities"] == 10 and split.stats["images"] == 50


def test_split_stats_histogram():
    stats = split_stats(np.array([0, 0, 0, 1, 2, 2]))
    assert stats["identities"] == 3 and stats["images"] == 6
    assert stats["images_per_identity"]["histogram"] == {"1": 1, "2": 1, "3": 1}
    assert stats["images_per_identity"]["median"] == 2.0


def test_unknown_split_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown split 'tiny'; valid: full, longtail, shallow"):
        make_split(_pool(), SplitSettings(name="tiny"))


def test_split_cache_round_trip(tmp_path):
    labels = _pool()
    settings = SplitSettings(name="longtail", seed=5)
    first = load_or_make_split(labels, settings, tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    second = load_or_make_split(labels, settings, tmp_path)
    assert np.array_equal(first.indices, second.indices) and first.stats == second.stats
