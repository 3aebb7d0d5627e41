"""Prototype Memory: loss and gradient against a sample-by-sample float64 reference, leave-one-out and plain
positives by hand, memory rows of the batch's classes never scoring, the memory's derived size, refresh and
ageing through training with a memory smaller than the classes, hard-class mining, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.base import METHODS, BatchSpec
from methods.registry import ConfigError
from tests.method_helpers import EMBEDDING, NUM_CLASSES, assert_state_dict_resumes_identically, build_tiny, harness_sgd, train_steps, view_batch



pytestmark = pytest.mark.usefixtures("one_thread")


def _build(cfg=None, seed=0, name="prototype_memory", num_classes=NUM_CLASSES):
    return build_tiny(name, cfg, seed, num_classes=num_classes)


def _unit(v):
    return v / v.norm()


def _reference_loss(embeddings, labels, memory_rows, memory_labels, s, m, arc=False, leave_one_out=True,
                    prototype_grad=True):
    """The PM loss (module docstring, eqs. 1-5) sample by sample, in the embeddings' dtype, differentiable
    w.r.t. ``embeddings``: margin on the positive (the sample's leave-one-out prototype, or its class
    prototype), the other batch classes' mean prototypes and the memory rows of classes absent from the
    batch as negatives. ``prototype_grad=False``: prototypes built from detached embeddings."""
    x = [_unit(row) for row in embeddings]
    built = x if prototype_grad else [row.detach() for row in x]
    labels = labels.tolist()
    classes = sorted(set(labels))
    prototype = {c: _unit(sum(built[j] for j, y in enumerate(labels) if y == c)) for c in classes}
    memory = [row.to(embeddings.dtype) for row, label in zip(memory_rows, memory_labels.tolist())
              if label != -1 and label not in classes]
    losses = []
    for i, c in enumerate(labels):
        if leave_one_out:
            positive = _unit(sum(built[j] for j, y in enumerate(labels) if y == c and j != i))
        else:
            positive = prototype[c]
        cos = x[i] @ positive
        if arc:
            assert float(torch.acos(cos.detach())) + m < math.pi  # the margin's plain branch
            target = torch.cos(torch.acos(cos) + m)
        else:
            target = cos - m
        logits = torch.stack([s * target] + [s * (x[i] @ prototype[d]) for d in classes if d != c]
                             + [s * (x[i] @ row) for row in memory])
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
@pytest.mark.parametrize("cfg", [{}, {"views_per_class": 3}, {"loss": "arcface", "m": 0.5},
                                 {"leave_one_out": False}, {"batch_prototype_grad": False},
                                 {"views_per_class": 3, "leave_one_out": False, "batch_prototype_grad": False}])
def test_loss_and_gradient_match_the_reference(cfg, dtype, tol):
    """Loss and its gradient w.r.t. the embeddings against the per-sample reference, after two steps filled
    the memory. Catches: a wrong positive (the sample left in or out against ``leave_one_out``), the margin
    on the wrong logit, memory rows of the batch's classes scoring, a detach in the wrong place (or none
    with ``batch_prototype_grad=False``), a sum instead of a mean. Relative tolerance 1e-9 in float64,
    2e-5 in float32 (the reference runs in float64)."""
    views = cfg.get("views_per_class", 2)
    method = _build({"memory_fraction": 1.0, **cfg})
    optimizer = harness_sgd(method)
    train_steps(method, optimizer, [view_batch([0, 1, 2], views, seed=1), view_batch([3, 4, 5], views, seed=2)])
    method = method.to(dtype)
    images, labels = view_batch([1, 4, 7], views, seed=3)  # 1 and 4 have (stale) rows in memory
    rows, row_labels = method.memory.prototypes.clone(), method.memory.labels.clone()
    assert set(row_labels.tolist()) - {-1} == {0, 1, 2, 3, 4, 5}
    with torch.no_grad():
        features = method.backbone(images.to(dtype))
    embeddings = features.clone().requires_grad_(True)
    logits, targets, _, _ = method.logits(embeddings, labels)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    reference_input = features.double().requires_grad_(True)
    expected = _reference_loss(reference_input, labels, rows.double(), row_labels, method.s, method.m,
                               arc=cfg.get("loss") == "arcface", leave_one_out=cfg.get("leave_one_out", True),
                               prototype_grad=cfg.get("batch_prototype_grad", True))
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=tol)
    assert torch.allclose(embeddings.grad.double(), reference_input.grad, rtol=tol * 10, atol=tol)


def _hand_batch():
    """Class 0: e1, e2; class 1: -e1, -e2 (16-dimensional, zero elsewhere)."""
    x = torch.zeros(4, EMBEDDING, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, 0], x[3, 1] = 1.0, 1.0, -1.0, -1.0
    return x, torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_positive_logits_by_hand(leave_one_out):
    """s = 2, m = 0.25, empty memory. Class prototypes: p_0 = (r, r), p_1 = (-r, -r), r = 1/sqrt(2).
    Leave-one-out: sample e1's positive is e2 (cosine 0), so its target logit is 2 (0 - 0.25) = -0.5.
    Plain prototype: its positive is p_0 (cosine r): 2 (r - 0.25) = sqrt(2) - 0.5. Every negative is
    2 (-r) = -sqrt(2). Catches the flag being ignored, the sample kept in (or left out of) its positive,
    and the margin on the wrong column."""
    method = _build({"s": 2.0, "m": 0.25, "leave_one_out": leave_one_out}).double()
    x, labels = _hand_batch()
    logits, targets, _, _ = method.logits(x, labels)
    target = -0.5 if leave_one_out else math.sqrt(2) - 0.5
    expected = torch.tensor([[target, -math.sqrt(2)], [target, -math.sqrt(2)],
                             [-math.sqrt(2), target], [-math.sqrt(2), target]], dtype=torch.float64)
    assert targets.tolist() == [0, 0, 1, 1]
    assert torch.allclose(logits, expected, atol=1e-12)
    loss = F.cross_entropy(logits, targets).item()
    assert loss == pytest.approx(math.log1p(math.exp(-math.sqrt(2) - target)), abs=1e-12)


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
    # The plain positive is the class prototype itself, and needs no second image.
    plain = _build({"views_per_class": 3, "leave_one_out": False})
    _, _, prototypes, positives = plain.prototypes(x[:4], torch.tensor([5, 5, 5, 2]))
    assert torch.equal(positives, prototypes[[1, 1, 1, 0]]) and torch.allclose(positives[3], x[3])


def test_memory_rows_of_batch_classes_never_score():
    method = _build({"memory_fraction": 1.0})
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


def test_default_memory_is_a_fraction_of_the_classes():
    """The default memory holds ``round(memory_fraction * classes)`` prototypes, ``memory_fraction = 0.1``,
    at least one batch of classes (8 images // 2 views = 4 here); ``memory_size`` overrides it and must
    hold one batch. Catches the default going back to every class (a full softmax over stale means), the
    fraction or the override ignored, the one-batch floor lost, and a memory too small for a batch's
    write accepted until the first step."""
    defaults = METHODS.get("prototype_memory").defaults()
    assert defaults["memory_size"] == 0 and defaults["memory_fraction"] == 0.1
    assert _build(num_classes=200).memory.capacity == 20
    assert _build({"memory_fraction": 0.25}, num_classes=200).memory.capacity == 50
    assert _build({"memory_fraction": 1.0}, num_classes=200).memory.capacity == 200
    assert _build().memory.capacity == 4 < NUM_CLASSES  # round(1.2) = 1, raised to one batch
    assert _build({"memory_size": 5}, num_classes=200).memory.capacity == 5
    message = ("method 'prototype_memory': memory_size (3) must hold one batch of classes: "
               "global batch 8 // views_per_class 2 = 4")
    with pytest.raises(ConfigError) as error:
        _build({"memory_size": 3})
    assert str(error.value) == message
    for bad in ({"memory_fraction": 0.0}, {"memory_fraction": 1.5}, {"memory_size": -1}):
        with pytest.raises(ConfigError, match="method 'prototype_memory': memory_"):
            _build(bad)


def test_refresh_and_ageing_through_training():
    """A derived memory of 6 slots for 12 classes (``memory_fraction = 0.5``), 4 classes a step. Catches a
    refreshed class moved or duplicated, a stale prototype kept after a refresh, and eviction of anything
    but the oldest prototypes."""
    method = _build({"memory_fraction": 0.5})
    assert method.memory.capacity == 6 < NUM_CLASSES
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
    """``batch_prototype_grad=False`` detaches the batch's prototypes (the reference test checks the
    gradients); here: the flag reaches the prototypes."""
    images, labels = view_batch([0, 1, 2])
    for flag in (True, False):
        method = _build({"batch_prototype_grad": flag}).eval()
        embeddings = method.backbone(images).detach().requires_grad_(True)
        assert method.logits(embeddings, labels)[3].requires_grad == flag


def test_mining_parameter_sets_the_batch_spec():
    """``hard_mining_neighbours = n`` asks the sampler for ``BatchSpec(hard_class_neighbours=n)``; off by
    default. Catches the parameter not reaching the batch spec (mining silently off in ``bench run``) and a
    neighbour count that cannot fit a batch accepted."""
    assert _build().batch_spec == BatchSpec(views_per_class=2)
    assert _build({"hard_mining_neighbours": 1}).batch_spec == BatchSpec(views_per_class=2, hard_class_neighbours=1)
    assert _build({"hard_mining_neighbours": 3, "views_per_class": 2}).batch_spec.hard_class_neighbours == 3
    for bad in (4, -1):  # 4 classes per batch: an anchor and at most 3 neighbours
        with pytest.raises(ConfigError, match=r"method 'prototype_memory': hard_mining_neighbours must be in \[0, 3\]"):
            _build({"hard_mining_neighbours": bad})


def test_nearest_classes_against_brute_force():
    """``nearest_classes`` (what the sampler calls) after training, against a loop over the memory's
    occupied slots: the ``count`` most similar other prototypes, nearest first, -1 for a class not in memory
    and past the stored ones; CPU int64. Catches the class itself or an empty slot returned, the order
    reversed, and a result on the memory's device or in another dtype."""
    method = _build({"memory_size": 6, "hard_mining_neighbours": 2})
    train_steps(method, harness_sgd(method), [view_batch([0, 1, 2, 3], seed=1), view_batch([4, 5, 6, 7], seed=2)])
    occupied = method.memory.occupied()
    assert int(occupied.sum()) == 6
    stored = dict(zip(method.memory.labels[occupied].tolist(), method.memory.prototypes[occupied]))
    query = torch.tensor([2, 7, 0, 11, 5])  # 0 was evicted, 11 never seen
    found = method.nearest_classes(query, 7)
    assert found.dtype == torch.int64 and found.device.type == "cpu" and found.shape == (5, 7)
    for row, label in zip(found.tolist(), query.tolist()):
        if label not in stored:
            assert row == [-1] * 7
            continue
        others = sorted(((float(stored[label] @ p), c) for c, p in stored.items() if c != label), reverse=True)
        assert row == [c for _, c in others] + [-1, -1]  # 5 others stored, then nothing
    assert method.nearest_classes(torch.tensor([2]), 0).shape == (1, 0)


def test_alias_and_parameter_errors():
    assert METHODS.canonical("pm") == "prototype_memory"
    method = _build(name="pm")
    assert method.batch_spec.views_per_class == 2 and method.encoder() is method.backbone
    for bad in ({"views_per_class": 1}, {"views_per_class": 1, "leave_one_out": False}, {"loss": "sphereface"},
                {"m": 3.5}, {"nope": 0}):
        with pytest.raises(ConfigError, match="method 'prototype_memory'"):
            _build(bad)


def test_resume_from_state_dict_continues_identically():
    batches = [view_batch(ids, seed=i) for i, ids in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                            [1, 3, 5, 7], [0, 2, 4, 6], [9, 8, 11, 10]])]
    assert_state_dict_resumes_identically(lambda seed: _build({"memory_size": 6}, seed=seed), batches)
