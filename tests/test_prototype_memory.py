"""Prototype Memory: loss against a sample-by-sample float64 reference, leave-one-out positives, memory
rows of the batch's classes never scoring, refresh and ageing through training, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.base import METHODS
from methods.registry import ConfigError
from tests.method_helpers import EMBEDDING, NUM_CLASSES, assert_state_dict_resumes_identically, build_tiny, harness_sgd, train_steps, view_batch



pytestmark = pytest.mark.usefixtures("one_thread")


def _build(cfg=None, seed=0, name="prototype_memory"):
    return build_tiny(name, cfg, seed)


def _reference_loss(embeddings, labels, memory_rows, memory_labels, s, m, arc=False):
    """The PM loss sample by sample in float64: leave-one-out positive with margin, the other batch
    classes' mean prototypes and the memory rows of classes absent from the batch as negatives."""
    x = F.normalize(embeddings.double(), dim=1)
    labels = labels.tolist()
    classes = sorted(set(labels))
    prototype = {c: F.normalize(x[[j for j, y in enumerate(labels) if y == c]].mean(0), dim=0) for c in classes}
    total = 0.0
    for i, c in enumerate(labels):
        others = [j for j, y in enumerate(labels) if y == c and j != i]
        positive = float(x[i] @ F.normalize(x[others].mean(0), dim=0))
        target = math.cos(math.acos(positive) + m) if arc else positive - m
        logits = [s * target] + [s * float(x[i] @ prototype[d]) for d in classes if d != c]
        logits += [s * float(x[i] @ row.double()) for row, label in zip(memory_rows, memory_labels.tolist())
                   if label != -1 and label not in classes]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    return total / len(labels)


@pytest.mark.parametrize("cfg", [{}, {"views_per_class": 3}, {"loss": "arcface", "m": 0.5}])
def test_loss_matches_the_reference(cfg):
    views = cfg.get("views_per_class", 2)
    method = _build(cfg)
    optimizer = harness_sgd(method)
    train_steps(method, optimizer, [view_batch([0, 1, 2], views, seed=1), view_batch([3, 4, 5], views, seed=2)])
    images, labels = view_batch([1, 4, 7], views, seed=3)  # 1 and 4 have (stale) rows in memory
    with torch.no_grad():
        embeddings = method.backbone(images)
        loss = method(images, labels).loss
    rows, row_labels = method.memory.prototypes.clone(), method.memory.labels.clone()
    assert set(row_labels.tolist()) - {-1} == {0, 1, 2, 3, 4, 5}
    expected = _reference_loss(embeddings, labels, rows, row_labels, method.s, method.m, arc="loss" in cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_leave_one_out_positive_excludes_the_sample():
    method = _build({"views_per_class": 3})
    x = F.normalize(torch.randn(6, EMBEDDING, dtype=torch.float64), dim=1)
    labels = torch.tensor([5, 5, 5, 2, 2, 2])
    classes, index, prototypes, leave_one_out = method.prototypes(x, labels)
    assert classes.tolist() == [2, 5] and index.tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.allclose(leave_one_out[0], F.normalize(x[1] + x[2], dim=0))
    assert torch.allclose(leave_one_out[4], F.normalize(x[3] + x[5], dim=0))
    assert torch.allclose(prototypes[1], F.normalize(x[:3].sum(0), dim=0))
    # The positive's gradient w.r.t. the sample's own embedding is only the direct term: perturbing the
    # sample does not move its own positive prototype.
    moved = x.clone()
    moved[0] = F.normalize(torch.randn(EMBEDDING, dtype=torch.float64), dim=0)
    assert torch.allclose(method.prototypes(moved, labels)[3][0], leave_one_out[0], atol=1e-12)
    assert not torch.equal(method.prototypes(moved, labels)[3][1], leave_one_out[1])
    with pytest.raises(ValueError, match="at least 2 images"):
        method.prototypes(x[:4], torch.tensor([5, 5, 5, 2]))


def test_memory_rows_of_batch_classes_never_score():
    method = _build()
    train_steps(method, harness_sgd(method), [view_batch([0, 1, 2, 3], seed=1)])
    method.eval()
    images, labels = view_batch([1, 2, 8, 9], seed=2)

    def loss_and_grad():
        embeddings = method.backbone(images).detach().requires_grad_(True)
        logits, targets, _, _ = method.logits(embeddings, labels)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        return loss.detach(), embeddings.grad

    loss, grad = loss_and_grad()
    in_batch = torch.isin(method.memory.labels, torch.tensor([1, 2]))
    method.memory.prototypes[in_batch] = F.normalize(torch.randn(int(in_batch.sum()), EMBEDDING), dim=1)
    loss2, grad2 = loss_and_grad()
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    with torch.no_grad():
        logits = method.logits(method.backbone(images), labels)[0]
        assert logits.shape == (8, 4 + 2)  # 4 batch classes + memory rows of 0 and 3 only
        method.memory.prototypes[method.memory.labels == 0] *= -1  # a class absent from the batch scores
        flipped = method.logits(method.backbone(images), labels)[0]
    # Columns: 4 batch prototypes, then memory slots in order (class 0, class 3).
    assert torch.equal(flipped[:, [0, 1, 2, 3, 5]], logits[:, [0, 1, 2, 3, 5]])
    assert torch.allclose(flipped[:, 4], -logits[:, 4])


def test_refresh_and_ageing_through_training():
    method = _build({"memory_size": 6})
    optimizer = harness_sgd(method)
    fresh = {}
    for step, identities in enumerate([[0, 1, 2, 3], [2, 3, 4, 5], [6, 7, 2, 8]]):
        images, labels = view_batch(identities, seed=step)
        with torch.no_grad():
            x = F.normalize(method.backbone(images), dim=1).view(4, 2, -1)
        for c, pair in zip(identities, x):
            fresh[c] = F.normalize(pair.mean(0), dim=0)
        slots_before = method.memory.slots_of(torch.tensor(identities))
        train_steps(method, optimizer, [(images, labels)])
        slots_after = method.memory.slots_of(torch.tensor(identities))
        known = slots_before >= 0
        assert torch.equal(slots_after[known], slots_before[known])  # refreshed in place
        occupied = method.memory.labels[method.memory.occupied()]
        assert occupied.unique().shape == occupied.shape  # never a duplicate
        for c in identities:
            assert torch.allclose(method.memory.prototypes[method.memory.slots_of(torch.tensor([c]))[0]], fresh[c],
                                  atol=1e-6)
    # Step 2 needed 3 slots in a full memory: the prototypes of 0 and 1 (step 0) and of 3 (step 1, lowest
    # slot among those of step 1 not refreshed now) were the oldest.
    assert sorted(method.memory.labels.tolist()) == [2, 4, 5, 6, 7, 8]


def test_batch_prototype_gradient_option():
    images, labels = view_batch([0, 1, 2])
    grads = {}
    for flag in (True, False):
        method = _build({"batch_prototype_grad": flag}).eval()
        embeddings = method.backbone(images).detach().requires_grad_(True)
        logits, targets, _, prototypes = method.logits(embeddings, labels)
        assert prototypes.requires_grad == flag
        F.cross_entropy(logits, targets).backward()
        grads[flag] = embeddings.grad
    assert not torch.allclose(grads[True], grads[False])


def test_alias_config_and_mining_helper():
    assert METHODS.canonical("pm") == "prototype_memory"
    method = _build(name="pm")
    assert method.memory.capacity == NUM_CLASSES and method.batch_spec.views_per_class == 2
    assert method.encoder() is method.backbone
    assert _build({"memory_size": 3}).memory.capacity == 3
    with pytest.raises(ConfigError, match="exceeds the memory size"):
        _build({"memory_size": 3})(*view_batch([0, 1, 2, 3]))
    for bad in ({"views_per_class": 1}, {"loss": "sphereface"}, {"m": 3.5}, {"nope": 0}):
        with pytest.raises(ConfigError, match="method 'prototype_memory'"):
            _build(bad)
    train_steps(method, harness_sgd(method), [view_batch([0, 1, 2, 3])])
    neighbours = method.hard_class_neighbours(torch.tensor([0, 11]), 2)
    assert neighbours.shape == (2, 2) and set(neighbours[0].tolist()) <= {1, 2, 3}
    assert neighbours[1].tolist() == [-1, -1]


def test_resume_from_state_dict_continues_identically():
    batches = [view_batch(ids, seed=i) for i, ids in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                            [1, 3, 5, 7], [0, 2, 4, 6], [9, 8, 11, 10]])]
    assert_state_dict_resumes_identically(lambda seed: _build({"memory_size": 6}, seed=seed), batches)
