"""DCQ: loss against the paper's equation in float64, label masking, momentum update formula, queue
writes and size rule, K-shot weights, encoders, exact resume. Also methods.momentum itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.momentum import MomentumEncoder, momentum_update_
from methods.registry import ConfigError
from tests.method_helpers import IMAGE, NUM_CLASSES, assert_state_dict_resumes_identically, build_tiny, harness_sgd, train_steps, view_batch



pytestmark = pytest.mark.usefixtures("one_thread")


def _build(cfg=None, seed=0, num_classes=NUM_CLASSES, batch_size=8):
    return build_tiny("dcq", cfg, seed, num_classes, batch_size)


def _reference_loss(q_raw, k_raw, labels, rows, row_labels, s, m):
    """The DCQ loss written sample by sample in float64 (positive first, masked queue after)."""
    q = F.normalize(q_raw.double(), dim=1)
    k = F.normalize(k_raw.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        positive = s * (float(q[i] @ k[i]) - m)
        negatives = [s * float(q[i] @ rows[j].double()) for j in range(rows.shape[0])
                     if int(row_labels[j]) != int(labels[i])]
        total += -positive + math.log(sum(math.exp(v) for v in [positive, *negatives]))
    return total / q.shape[0]


def test_loss_matches_the_equation_with_masked_queue():
    method = _build({"queue_size": 8})
    method.train()
    # Two steps fill the queue with real weights of identities 0-3 and 4-7.
    train_steps(method, harness_sgd(method), [view_batch([0, 1, 2, 3], seed=1), view_batch([4, 5, 6, 7], seed=2)])
    images, labels = view_batch([1, 5, 8, 9], seed=3)  # 1 and 5 are in the queue: must be masked
    rows, row_labels = method.queue.live()
    assert set(row_labels.tolist()) == set(range(8))
    with torch.no_grad():
        q_raw = method.backbone(images[0::2])
        k_raw = method.weight_generator(images[1::2])
        out = method(images, labels)
    expected = _reference_loss(q_raw, k_raw, labels[0::2], rows.clone(), row_labels.clone(), 50.0, 0.3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_same_identity_queue_rows_never_score():
    method = _build({"queue_size": 8})
    train_steps(method, harness_sgd(method), [view_batch([0, 1, 2, 3], seed=1), view_batch([4, 5, 6, 7], seed=2)])
    images, labels = view_batch([1, 5, 8, 9], seed=3)
    identity = labels[0::2]
    method.eval()  # deterministic embeddings for the comparisons below
    with torch.no_grad():
        weights = method.generate_weights(images.view(4, 2, 3, IMAGE, IMAGE)[:, 1:])
    queries = method.backbone(images[0::2]).detach().requires_grad_(True)
    logits = method.logits(queries, weights, identity)
    row_labels = method.queue.live()[1]
    same = identity.unsqueeze(1) == row_labels.unsqueeze(0)
    assert same.sum() == 2  # identities 1 and 5 each have one row
    assert torch.isinf(logits[:, 1:][same]).all() and (logits[:, 1:][same] < 0).all()
    assert torch.isfinite(logits[:, 1:][~same]).all()
    probabilities = logits.softmax(dim=1)
    assert (probabilities[:, 1:][same] == 0).all()

    def losses_and_grad():
        q = queries.detach().requires_grad_(True)
        losses = F.cross_entropy(method.logits(q, weights, identity), torch.zeros_like(identity), reduction="none")
        losses.sum().backward()
        return losses.detach(), q.grad

    losses, grad = losses_and_grad()
    # Overwrite the row of identity 1 with identity 5's class weight: sample 0 (identity 1) must not
    # notice; for sample 1 (identity 5) it is an ordinary negative, so its loss changes.
    slot_of_1 = int((row_labels == 1).nonzero())
    method.queue.features[slot_of_1] = weights[1]
    losses2, grad2 = losses_and_grad()
    assert torch.equal(losses[0], losses2[0]) and torch.equal(grad[0], grad2[0])
    assert losses2[1] != losses[1]


def test_momentum_update_formula_parameters_and_buffers():
    for rule in ("ema", "own"):
        method = _build({"momentum_buffers": rule, "momentum": 0.9})
        optimizer = harness_sgd(method)
        images, labels = view_batch([0, 1, 2, 3])
        method(images, labels).loss.backward()
        optimizer.step()
        generator, backbone = method.weight_generator.encoder, method.backbone
        before = {k: v.clone().double() for k, v in generator.state_dict().items()}
        source = {k: v.clone().double() for k, v in backbone.state_dict().items()}
        method.on_step_end()
        after = generator.state_dict()
        param_names = {name for name, _ in generator.named_parameters()}
        for name, value in after.items():
            if name in param_names or (rule == "ema" and value.is_floating_point()):
                expected = 0.9 * before[name] + 0.1 * source[name]
                assert torch.allclose(value.double(), expected, atol=1e-6), (rule, name)
            else:
                assert torch.equal(value.double(), before[name]), (rule, name)
        assert not any(p.requires_grad for p in generator.parameters())


def test_momentum_update_primitives():
    source, target = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    expected = [0.99 * t.detach() + 0.01 * s.detach() for t, s in zip(target.parameters(), source.parameters())]
    momentum_update_(target, source, 0.99)
    for value, reference in zip(target.parameters(), expected):
        assert torch.allclose(value, reference, atol=1e-15)
    encoder = MomentumEncoder(source, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), source.parameters()))
    with pytest.raises(ValueError, match="differ in layout"):
        momentum_update_(nn.Linear(3, 2), nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(source, 1.5)


def test_queue_receives_the_batch_weights_fifo():
    method = _build({"queue_size": 8})
    optimizer = harness_sgd(method)
    for step, identities in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]):
        images, labels = view_batch(identities, seed=step)
        with torch.no_grad():
            expected = F.normalize(method.weight_generator(images[1::2]), dim=1)
        train_steps(method, optimizer, [(images, labels)])
        features, row_labels = method.queue.ordered()
        assert row_labels[-4:].tolist() == identities
        assert torch.allclose(features[-4:], expected, atol=1e-6)
        assert int(method.queue.ptr) == 4 * (step + 1) % 8
    assert method.queue.ordered()[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # the oldest batch is gone


def test_queue_size_rule():
    """The queue is allocated at construction with the documented size (hand-computed from the rule:
    fraction x classes rounded down to the weights per global step, at least one step). Catches a wrong
    rounding, a size taken from the local instead of the global batch, and lazy allocation (capacity 0)."""
    capacity = lambda cfg=None, **shape: _build(cfg, **shape).queue.capacity  # noqa: E731
    assert capacity(num_classes=85742, batch_size=1024) == 8192  # MS1MV2, 512 weights per step
    assert capacity(num_classes=1000, batch_size=128) == 64       # SynthFace: one step's weights
    assert capacity() == 4
    assert capacity({"queue_fraction": 0.5}, num_classes=1000, batch_size=128) == 448
    assert capacity({"shots": 3}, batch_size=16) == 4             # 16 images = 4 identities x (1 + 3)
    with pytest.raises(ConfigError, match="multiple of the weights enqueued per step"):
        _build({"queue_size": 10})
    assert _build({"shots": 3}).batch_spec.views_per_class == 4


def test_k_shot_weight_is_the_mean_of_normalised_references():
    method = _build({"shots": 2}).eval()
    images, labels = view_batch([0, 1, 2], views=3)
    grouped = images.view(3, 3, 3, IMAGE, IMAGE)
    weights = method.generate_weights(grouped[:, 1:])
    with torch.no_grad():
        first = F.normalize(method.weight_generator(grouped[:, 1]), dim=1)
        second = F.normalize(method.weight_generator(grouped[:, 2]), dim=1)
    assert torch.allclose(weights, F.normalize(first + second, dim=1), atol=1e-6)
    assert torch.isfinite(method.train()(images, labels).loss)


def test_batch_spec_encoders_and_config_errors():
    method = _build()
    assert method.batch_spec.views_per_class == 2 and method.batch_spec.views_with_replacement
    assert not _build({"key_with_replacement": False}).batch_spec.views_with_replacement
    assert method.encoder() is method.weight_generator and method.encoder("momentum") is method.weight_generator
    assert method.encoder("query") is method.backbone
    with pytest.raises(ConfigError, match="no encoder 'probe'"):
        method.encoder("probe")
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    assert trainable == {id(p) for p in method.backbone.parameters() if p.requires_grad}
    for bad in ({"momentum_buffers": "x"}, {"shots": 0}, {"queue_fraction": 0}, {"s": 0}, {"nope": 1}):
        with pytest.raises(ConfigError, match="method 'dcq'"):
            _build(bad)
    with pytest.raises(ValueError, match="adjacent"):
        method(torch.randn(4, 3, IMAGE, IMAGE), torch.tensor([0, 1, 0, 1]))


def test_resume_from_state_dict_continues_identically():
    batches = [view_batch(ids, seed=i) for i, ids in enumerate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                            [1, 3, 5, 7], [0, 2, 4, 6], [9, 8, 11, 10]])]
    assert_state_dict_resumes_identically(lambda seed: _build({"queue_size": 8}, seed=seed), batches)
