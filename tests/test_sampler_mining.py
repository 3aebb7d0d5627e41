"""Hard-class mining batches (bench/data/sampler.py ``HardClassBatchSampler``), checked against the rule
written out by hand: anchors from the epoch stream, each followed by the neighbours the method names,
unknown / foreign / repeated neighbours replaced from a per-batch fill stream."""

from __future__ import annotations

import numpy as np
import pytest

from bench.data.sampler import HardClassBatchSampler

#: Class ids 100, 103, 106, ... (not 0..n-1), so a sampler that confuses class ids with its own identity
#: indices fails.
IDS = 100 + 3 * np.arange(20)
LABELS = np.repeat(IDS, 4)


def _neighbours(table: dict[int, list[int]]):
    calls = []

    def nearest(classes: np.ndarray, count: int) -> np.ndarray:
        calls.append(np.asarray(classes).copy())
        return np.array([table.get(int(c), [-1] * count)[:count] for c in classes], dtype=np.int64)

    return nearest, calls


def _classes_of(batch: np.ndarray, views: int) -> list[int]:
    groups = LABELS[batch].reshape(-1, views)
    assert (groups == groups[:, :1]).all(), "the k views of one identity must be adjacent and of that identity"
    return groups[:, 0].tolist()


def test_each_anchor_is_followed_by_the_neighbours_the_method_names():
    """P = 16 / 2 = 8 identities, n = 1: 4 anchors, each followed by its named neighbour."""
    table = {int(c): [int(IDS[(i + 7) % 20])] for i, c in enumerate(IDS)}
    nearest, calls = _neighbours(table)
    sampler = HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=0, neighbours=1, nearest=nearest)
    classes = _classes_of(sampler.batch(0), 2)
    (anchors,) = calls
    assert anchors.shape == (4,) and set(anchors.tolist()) <= set(IDS.tolist())
    assert len(set(classes)) == 8
    expected = []
    for a in anchors.tolist():
        for c in (a, table[a][0]):
            if c not in expected:
                expected.append(c)
    assert classes[:len(expected)] == expected[:8]


def test_unknown_foreign_and_repeated_neighbours_are_filled_with_distinct_identities():
    """Neighbours -1 (unknown), 999 (not in the training set) and an anchor already in the batch leave their
    slots to the fill stream: still 8 distinct identities of the training set in every batch."""
    first = int(IDS[0])
    table = {int(c): [-1, 999, first] for c in IDS}
    nearest, _ = _neighbours(table)
    sampler = HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=1, neighbours=3, nearest=nearest)
    for number in range(12):
        classes = _classes_of(sampler.batch(number), 2)
        assert len(set(classes)) == 8 and set(classes) <= set(IDS.tolist())


def test_every_identity_is_an_anchor_once_per_epoch_and_batches_repeat_by_number():
    """20 identities, 4 anchors per batch: batches 0-4 use every identity as an anchor once; the same batch
    number (with the same answers from the method) gives the same batch."""
    nearest, calls = _neighbours({})
    sampler = HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=5, neighbours=1, nearest=nearest)
    first = [sampler.batch(k) for k in range(5)]
    anchors = np.concatenate(calls)
    assert sorted(anchors.tolist()) == sorted(IDS.tolist())
    again = HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=5, neighbours=1, nearest=nearest)
    assert all(np.array_equal(again.batch(k), first[k]) for k in range(5))


def test_a_method_answer_of_the_wrong_shape_and_bad_neighbour_counts_are_refused():
    sampler = HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=0, neighbours=1,
                                    nearest=lambda classes, count: np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="expected"):
        sampler.batch(0)
    with pytest.raises(Exception, match="neighbour"):
        HardClassBatchSampler(LABELS, batch_size=16, views_per_class=2, seed=0, neighbours=0, nearest=None)


def test_bench_run_composes_prototype_memory_batches_from_its_memory(tiny_args, monkeypatch):
    """`bench run` with ``hard_mining_neighbours=1`` serves Prototype Memory batches from the mining sampler,
    which asks the method for neighbours of every batch's anchors after the first step; the answers are
    class ids the memory holds (once it holds any). Catches the batch spec not reaching the runner, the
    sampler not built from it, and the method's answer not reaching the batch."""
    from typer.testing import CliRunner

    import methods.prototype_memory
    from bench.cli import app

    asked = []
    nearest = methods.prototype_memory.PrototypeMemory.nearest_classes

    def spy(self, classes, count):
        found = nearest(self, classes, count)
        asked.append((classes.clone(), found.clone(), self.memory.labels.clone()))
        return found

    monkeypatch.setattr(methods.prototype_memory.PrototypeMemory, "nearest_classes", spy)
    result = CliRunner().invoke(app, ["run", "--methods", "pm", *tiny_args, "--eval", "synth-lfw",
                                      "--set", "method_params.prototype_memory.hard_mining_neighbours=1",
                                      "--set", "method_params.prototype_memory.memory_size=16"])
    assert result.exit_code == 0, result.output
    steps = 128 // 32
    assert len(asked) == steps
    later = [(found, memory) for _, found, memory in asked[1:]]
    assert any((found >= 0).any() for found, _ in later)
    for found, memory in later:
        assert np.isin(found[found >= 0].numpy(), memory.numpy()).all()
