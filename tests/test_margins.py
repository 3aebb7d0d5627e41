"""Margin formulas and the baseline heads against closed forms written independently here (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace, CosFace
from methods.margins import ArcFaceRule, arc_margin, cos_margin, replace_target, straight_through
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


def test_arc_margin_without_guard():
    theta = _angles(170, 100, 30)
    c = torch.cos(theta)
    assert torch.allclose(arc_margin(c, 0.5, guard=False), torch.cos(theta + 0.5), atol=1e-12)


def test_easy_margin_against_hand_computed_values():
    """insightface's easy margin: cos(theta + m) where cos(theta) > 0, else cos(theta). With m = 30 deg:
    theta = 30 -> cos 60 = 0.5; theta = 60 -> cos 90 = 0; theta = 120 -> kept, cos 120 = -0.5; theta = 170
    -> kept (the default fallback would give cos 170 - (pi/6) sin 30 instead). Catches the easy margin
    being dropped (theta = 120 would give cos 150) or applied on the wrong side of 0."""
    c = torch.cos(_angles(30, 60, 120, 170)).requires_grad_(True)
    out = arc_margin(c, math.pi / 6, easy_margin=True)
    expected = torch.tensor([0.5, 0.0, -0.5, math.cos(math.radians(170))])
    assert torch.allclose(out, expected, atol=1e-12)
    out.sum().backward()
    # d/dc cos(acos c + m) = cos m + sin m * c / sqrt(1 - c^2): at c = cos 30 deg, cos 30 + 0.5 cot 30 =
    # sqrt(3); at c = cos 60 deg, cos 30 + 0.5 cot 60 = 2 / sqrt(3); the kept cosines have derivative 1.
    assert torch.allclose(c.grad, torch.tensor([math.sqrt(3), 2 / math.sqrt(3), 1.0, 1.0]), atol=1e-12)


def test_easy_margin_with_fallback_false_is_refused_in_one_line():
    """fallback=False reproduces arcface_torch since Dec 2022, which has no easy margin: the combination
    used to drop easy_margin silently. Catches that silence coming back (head, rule or margin function)."""
    with pytest.raises(ConfigError, match="^ArcFace: easy_margin=True cannot be combined with fallback=False$"):
        ArcFace(4, 3, easy_margin=True, fallback=False)
    with pytest.raises(ConfigError, match="easy_margin=True cannot be combined with fallback=False"):
        ArcFaceRule(s=64.0, easy_margin=True, guard=False)
    with pytest.raises(ConfigError, match="easy_margin=True cannot be combined with guard=False"):
        arc_margin(torch.tensor([0.5]), 0.5, easy_margin=True, guard=False)
    for flag in (True, False):  # each of the two other combinations still builds
        ArcFace(4, 3, easy_margin=flag, fallback=flag)


def test_arc_margin_gradient_at_cos_minus_one_is_the_fallbacks():
    """At cos = -1 exactly (an embedding opposite its center) the fallback (cos - m sin m, or cos itself
    with easy_margin) is selected, so the gradient is exactly 1; the unselected branch's sqrt(1 - c^2) has an
    infinite derivative there, which torch.where's backward turns into 0 * inf = NaN unless sin_from_cos
    floors 1 - c^2. Catches the floor being removed (NaN), and a wrong branch at the edge (any value but 1)."""
    for kwargs in ({}, {"easy_margin": True}):
        c = torch.tensor([-1.0], requires_grad=True)
        out = arc_margin(c, 0.5, **kwargs)
        out.backward()
        expected = -1.0 if kwargs else -1.0 - 0.5 * math.sin(0.5)
        assert out.item() == pytest.approx(expected, abs=1e-15)
        assert torch.isfinite(c.grad).all() and c.grad.item() == 1.0, kwargs


def test_cos_margin_and_its_gradient():
    c = torch.tensor([0.7, -0.4], requires_grad=True)
    out = cos_margin(c, 0.4)
    out.sum().backward()
    assert torch.allclose(out, torch.tensor([0.3, -0.8]))
    assert torch.allclose(c.grad, torch.ones(2))


def test_straight_through_value_is_arcface_and_gradient_is_the_plain_cosines():
    """Forward: ArcFace's closed form cos(theta + m), written here from the angles. Backward: the gradient
    of the plain cosine logit (no margin), taken by autograd on a separate expression. Weights w make the
    upstream gradient non-uniform, so a gradient that ignores it, keeps the margin's derivative
    (cos m + sin m cot theta) or is dropped fails."""
    theta = _angles(20, 75, 110)
    m = 0.5
    w = torch.tensor([0.7, -1.3, 2.1])
    c = torch.cos(theta).requires_grad_(True)
    out = straight_through(c, arc_margin(c, m))
    (w * out).sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([math.cos(t + m) for t in theta.tolist()]), atol=1e-12)
    plain = torch.cos(theta).requires_grad_(True)
    (w * plain).sum().backward()
    assert torch.equal(c.grad, plain.grad)


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


@pytest.mark.parametrize("fallback", [True, False])
def test_arcface_head_beyond_pi_minus_m_loss_and_gradients(fallback):
    """Embeddings pointing away from their centers (theta_y = 170 and 160 deg > pi - m) put the target in the
    fallback branch inside the head (with fallback=False: unguarded cos(theta + m)); the loss and both
    gradients must equal the per-sample reference. Catches a head that skips the fallback, or whose
    fallback gradient is wrong (cos - m sin m has derivative 1, cos(theta + m) there the opposite sign)."""
    head = ArcFace(2, 3, s=10.0, m=0.5, fallback=fallback).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.5, -1.5]]))
    angles = _angles(170, 250)  # 170 deg from center 0 (at 0 deg); 250 deg is 160 deg from center 1 (90 deg)
    embeddings = torch.stack([torch.cos(angles), torch.sin(angles)], 1).mul(3.0).requires_grad_(True)
    labels = torch.tensor([0, 1])
    loss = head(embeddings, labels)
    loss.backward()
    target = _arc_reference(0.5) if fallback else (lambda cos: torch.cos(torch.acos(cos) + 0.5))
    emb_ref = embeddings.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    ref = _reference_loss(emb_ref, w_ref, labels, 10.0, target)
    ref.backward()
    assert (torch.cos(_angles(170, 160)) < math.cos(math.pi - 0.5)).all()  # both targets in the branch
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(embeddings.grad, emb_ref.grad, atol=1e-10)
    assert torch.allclose(head.weight.grad, w_ref.grad, atol=1e-10)
    logits_loss = torch.nn.functional.cross_entropy(head.logits(embeddings.detach(), labels), labels)
    assert logits_loss.item() == pytest.approx(ref.item(), rel=1e-10)  # the plain path too


def test_straight_through_arcface_gradient_equals_plain_normalised_softmax():
    """arcface_torch since Dec 2022: the loss has ArcFace's value, and its gradient is that of
    mean_i sum_k (p_ik - onehot_ik) s cos_ik with p the margin-applied softmax held constant. Both are built
    here from the closed form (per-sample loop), independent of the head. Catches the straight-through
    head differentiating the margin (the exact ArcFace gradient, shown to differ) or losing its value."""
    torch.manual_seed(1)
    s, m = 16.0, 0.5
    arc = ArcFace(4, 3, s=s, m=m, grad="straight_through").double()
    x1 = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loss_arc = arc(x1, labels)
    loss_arc.backward()

    weight = arc.weight.detach()
    x_ref = x1.detach().clone().requires_grad_(True)
    assert loss_arc.item() == pytest.approx(
        _reference_loss(x_ref.detach(), weight, labels, s, _arc_reference(m)).item(), rel=1e-12)
    surrogate = []
    for i in range(5):
        xi = x_ref[i] / x_ref[i].norm()
        cos = torch.stack([torch.dot(xi, weight[j] / weight[j].norm()) for j in range(3)])
        logits = s * torch.stack([_arc_reference(m)(c.detach()) if j == labels[i] else c.detach()
                                  for j, c in enumerate(cos)])
        p = torch.softmax(logits, 0)
        onehot = torch.nn.functional.one_hot(labels[i], 3).double()
        surrogate.append(((p - onehot) * s * cos).sum())
    torch.stack(surrogate).mean().backward()
    assert torch.allclose(x1.grad, x_ref.grad, atol=1e-10)
    exact = ArcFace(4, 3, s=s, m=m).double()
    with torch.no_grad():
        exact.weight.copy_(arc.weight)
    x2 = x1.detach().clone().requires_grad_(True)
    exact(x2, labels).backward()
    assert not torch.allclose(x2.grad, x1.grad, atol=1e-3)  # so the check above can tell them apart


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
