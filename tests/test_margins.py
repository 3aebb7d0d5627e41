"""Margin formulas and the baseline heads against closed forms written independently here (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace, CosFace
from methods.margins import arc_margin, cos_margin, replace_target, straight_through
from methods.registry import ConfigError



pytestmark = pytest.mark.usefixtures("float64_default")  # every tensor float64 unless a test says otherwise


def _angles(*degrees: float) -> torch.Tensor:
    return torch.tensor([math.radians(d) for d in degrees], dtype=torch.float64)


def test_arc_margin_values_match_cos_theta_plus_m_below_pi():
    theta = _angles(0.5, 10, 45, 90, 120, 150)
    m = 0.5
    got = arc_margin(torch.cos(theta), m)
    assert torch.allclose(got, torch.cos(theta + m), atol=1e-12)


def test_arc_margin_falls_back_beyond_pi_minus_m():
    # theta + m > pi: the target logit is cos(theta) - m*sin(m) (insightface's pre-2023 fallback)
    m = 0.5
    theta = torch.tensor([math.pi - 0.3, math.pi - 0.01])
    got = arc_margin(torch.cos(theta), m)
    assert torch.allclose(got, torch.cos(theta) - m * math.sin(m), atol=1e-12)
    # and it stays monotonic (decreasing in theta) across the switch
    sweep = torch.linspace(0.01, math.pi - 1e-6, 2001)
    values = arc_margin(torch.cos(sweep), m)
    assert torch.all(values[1:] <= values[:-1] + 1e-12)


def test_arc_margin_gradient_is_that_of_cos_theta_plus_m():
    # d/dc cos(acos(c) + m) = cos(m) + sin(m) * c / sqrt(1 - c^2)
    c = torch.tensor([0.9, 0.3, -0.2, 0.0], requires_grad=True)
    m = 0.5
    arc_margin(c, m).sum().backward()
    expected = math.cos(m) + math.sin(m) * c.detach() / torch.sqrt(1 - c.detach() ** 2)
    assert torch.allclose(c.grad, expected, atol=1e-10)


def test_arc_margin_without_guard_and_easy_margin():
    theta = _angles(170, 100, 30)
    c = torch.cos(theta)
    assert torch.allclose(arc_margin(c, 0.5, guard=False), torch.cos(theta + 0.5), atol=1e-12)
    easy = arc_margin(c, 0.5, easy_margin=True)
    expected = torch.where(c > 0, torch.cos(theta + 0.5), c)
    assert torch.allclose(easy, expected, atol=1e-12)


def test_arc_margin_finite_gradient_at_cos_one():
    c = torch.tensor([1.0, -1.0], requires_grad=True)
    arc_margin(c, 0.5).sum().backward()
    assert torch.isfinite(c.grad).all()


def test_cos_margin_and_its_gradient():
    c = torch.tensor([0.7, -0.4], requires_grad=True)
    out = cos_margin(c, 0.4)
    out.sum().backward()
    assert torch.allclose(out, torch.tensor([0.3, -0.8]))
    assert torch.allclose(c.grad, torch.ones(2))


def test_straight_through_has_margin_value_and_identity_gradient():
    c = torch.tensor([0.8, 0.1], requires_grad=True)
    out = straight_through(c, arc_margin(c, 0.5))
    out.sum().backward()
    assert torch.allclose(out, arc_margin(c.detach(), 0.5))
    assert torch.allclose(c.grad, torch.ones(2))


def test_replace_target_skips_negative_labels():
    logits = torch.arange(6.0).view(2, 3)
    out = replace_target(logits, torch.tensor([2, -1]), torch.tensor([-5.0, -7.0]))
    assert out.tolist() == [[0.0, 1.0, -5.0], [3.0, 4.0, 5.0]]


# --- heads against a per-sample reference (the way pytorch-metric-learning checks its ArcFace) ---

def _reference_loss(embeddings, weight, labels, s, target_fn):
    """Mean over samples of -log softmax, each row built element by element from the paper's formula."""
    losses = []
    for i in range(embeddings.shape[0]):
        x = embeddings[i] / embeddings[i].norm()
        row = []
        for j in range(weight.shape[0]):
            w = weight[j] / weight[j].norm()
            cos = torch.clamp(torch.dot(x, w), -1.0, 1.0)
            row.append(s * (target_fn(cos) if j == labels[i] else cos))
        row = torch.stack(row)
        losses.append(torch.logsumexp(row, 0) - row[labels[i]])
    return torch.stack(losses).mean()


def _arc_reference(m):
    def fn(cos):
        theta = torch.acos(cos)
        return torch.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)
    return fn


@pytest.mark.parametrize("head_cls, kwargs, target_fn", [
    (ArcFace, {"s": 64.0, "m": 0.5}, _arc_reference(0.5)),
    (ArcFace, {"s": 30.0, "m": 0.3}, _arc_reference(0.3)),
    (CosFace, {"s": 64.0, "m": 0.4}, lambda cos: cos - 0.4),
])
def test_head_loss_and_gradients_match_reference(head_cls, kwargs, target_fn):
    torch.manual_seed(0)
    head = head_cls(8, 5, **kwargs).double()
    embeddings = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = head(embeddings, labels)
    loss.backward()
    grad_emb, grad_w = embeddings.grad.clone(), head.weight.grad.clone()

    weight = head.weight.detach().clone().requires_grad_(True)
    embeddings_ref = embeddings.detach().clone().requires_grad_(True)
    ref = _reference_loss(embeddings_ref, weight, labels, kwargs["s"], target_fn)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-10)
    assert torch.allclose(grad_emb, embeddings_ref.grad, atol=1e-9)
    assert torch.allclose(grad_w, weight.grad, atol=1e-9)


def test_arcface_handles_target_beyond_pi_minus_m():
    # An embedding pointing away from its center exercises the fallback branch inside the head.
    head = ArcFace(2, 2, s=10.0, m=0.5).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embeddings = torch.tensor([[-1.0, 0.05]], requires_grad=True)
    loss = head(embeddings, torch.tensor([0]))
    ref = _reference_loss(embeddings.detach(), head.weight.detach(), torch.tensor([0]), 10.0, _arc_reference(0.5))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


def test_straight_through_arcface_gradient_equals_plain_normalised_softmax():
    torch.manual_seed(1)
    arc = ArcFace(4, 3, s=16.0, m=0.5, grad="straight_through").double()
    plain = CosFace(4, 3, s=16.0, m=0.0).double()
    with torch.no_grad():
        plain.weight.copy_(arc.weight)
    x1 = torch.randn(5, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss_arc = arc(x1, labels)
    loss_plain = plain(x2, labels)
    # the margin is in the value ...
    assert loss_arc.item() > loss_plain.item()
    # ... but the backward pass differentiates the margin-free logits with the margin-applied softmax
    loss_arc.backward()
    logits = arc.logits(x1.detach(), labels)
    probs = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    x3 = x1.detach().clone().requires_grad_(True)
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(x3), torch.nn.functional.normalize(arc.weight.detach()))
    (((probs - onehot) * 16.0 * cos).sum() / 5).backward()
    assert torch.allclose(x1.grad, x3.grad, atol=1e-10)


def test_heads_run_in_float32_and_reject_bad_values():
    torch.set_default_dtype(torch.float32)
    try:
        head = ArcFace(16, 10)
        loss = head(torch.randn(4, 16), torch.tensor([1, 2, 3, 4]))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    finally:
        torch.set_default_dtype(torch.float64)
    with pytest.raises(ConfigError, match="margin m"):
        ArcFace(4, 3, m=4.0)
    with pytest.raises(ConfigError, match="scale s"):
        CosFace(4, 3, s=0.0)
    with pytest.raises(ConfigError, match="grad"):
        ArcFace(4, 3, grad="sometimes")
