"""The numerical guards of the heads, at the inputs where they act, against values computed here.

Three guards keep a head's loss and gradients finite: the 1e-12 floor under sin(theta) = sqrt(1 - cos^2)
(:func:`methods.margins.sin_from_cos`; d sin / d cos is infinite at cos = +-1), and the 1e-12 floors of the
embedding and center norms (``x / max(|x|, 1e-12)``, as ``F.normalize``; a zero vector has no direction).
Each test builds the input where one guard acts (cos exactly 1, a zero center, a zero embedding), so it
fails with NaN if the guard is removed, and checks the value against a reference written independently of
the head. Both code paths are checked: the fused loss (``head(x, y)``) and plain autograd (``head.logits``).
float64 throughout; tolerances are relative 1e-10 (loss) and absolute 1e-9 (gradients of size <= s),
except where the floor itself moves a value (stated there).
"""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace

S = 4.0  # small, so that no row's softmax saturates and every logit moves the loss
F64 = torch.float64


def _both_paths(head, embeddings, labels):
    """(loss, d loss / d embeddings, d loss / d centers) from the fused loss and from the plain path."""
    out = []
    for plain in (False, True):
        x = embeddings.clone().requires_grad_(True)
        loss = (torch.nn.functional.cross_entropy(head.logits(x, labels), labels) if plain else head(x, labels))
        out.append((loss, *torch.autograd.grad(loss, (x, head.weight))))
    return out


def _axes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


@pytest.mark.parametrize("name, make_head, target_at_one", [
    ("arcface", lambda: ArcFace(4, 3, s=S, m=0.5), math.cos(0.5)),
    ("arcface-nofallback", lambda: ArcFace(4, 3, s=S, m=0.5, fallback=False), math.cos(0.5)),
    ("mv-arc", lambda: MVSoftmax(4, 3, s=S, base="arc"), math.cos(0.35)),
    ("mv-arc-fixed-always", lambda: MVSoftmax(4, 3, s=S, base="arc", variant="fixed", target_condition="always"),
     math.cos(0.35)),
    ("npcface", lambda: NPCFace(4, 3, s=S), math.cos(0.40)),  # no hard negative: m' = m0
], ids=lambda v: v if isinstance(v, str) else "")
def test_embedding_exactly_at_its_center(name, make_head, target_at_one):
    """Row 0 points exactly at its center (cos_y = 1.0 exactly: powers of two, no rounding). There
    d cos(theta + m) / d cos is infinite, but d cos_y / d x = 0 (cos_y is at its maximum), so row 0's target
    contributes a constant s f(1) and no gradient. The reference is the softmax over logits written out:
    row 0's target the constant, its negatives s cos (all below every threshold: no hard negatives), and
    row 1 (cos_y = 0.9, negatives 0.3 and 0.22, none hard) with its full formula. Catches the sin floor
    removed (inf * 0 = NaN) and a wrong target value at cos = 1."""
    head = make_head().double()
    centers = _axes([4.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 2.0, 1.0])
    with torch.no_grad():
        head.weight.copy_(centers)
    embeddings = _axes([2.0, 0, 0, 0], [0.3, 0.9, 0.1, 0.3])  # row 0 exactly along center 0
    labels = torch.tensor([0, 1])

    x = embeddings.clone().requires_grad_(True)
    w = centers.clone().requires_grad_(True)
    rows = []
    for i in range(2):
        xi = x[i] / x[i].norm()
        cos = [torch.dot(xi, w[k] / w[k].norm()) for k in range(3)]
        if i == 0:
            target = torch.tensor(target_at_one, dtype=F64)  # a constant: d cos_y / d x = 0 here
        else:
            if name == "npcface":
                margin = 0.40
            else:
                margin = 0.5 if name.startswith("arcface") else 0.35
            target = torch.cos(torch.acos(cos[1]) + margin)  # 0.9 > every condition
        rows.append(torch.stack([S * (target if k == int(labels[i]) else c) for k, c in enumerate(cos)]))
    logits = torch.stack(rows)
    head_target = head.logits(embeddings, labels)[0, 0].item()
    assert head_target == pytest.approx(S * target_at_one, rel=0, abs=S * 1e-6)  # floor: sin = 1e-6, not 0
    expected = torch.nn.functional.cross_entropy(logits, labels)
    ref_x, ref_w = torch.autograd.grad(expected, (x, w))

    for loss, grad_x, grad_w in _both_paths(head, embeddings, labels):
        assert torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()
        # the floor makes sin(theta) 1e-6 instead of 0 at cos = 1, moving row 0's target logit by at most
        # s * 1e-6: the mean loss over the 2 rows by at most s * 1e-6 / 2, and the gradients (through the
        # softmax) by O(s^2 * 1e-6); measured: 2e-7
        assert loss.item() == pytest.approx(expected.item(), rel=0, abs=S * 1e-6 / 2)
        assert torch.allclose(grad_x, ref_x, rtol=0, atol=S * S * 1e-6)
        assert torch.allclose(grad_w, ref_w, rtol=0, atol=S * S * 1e-6)


def test_zero_center():
    """Class 2's center is exactly zero: its cosine to every embedding is 0 (x / max(|x|, 1e-12) of a zero
    vector), a constant logit. Reference: ArcFace over logits with that column the constant 0; the zero
    center's own gradient is the convention's value (1 / 1e-12) sum_i dL/dcos_i2 x_hat_i. Catches the
    center-norm floor removed (0 / 0 = NaN in the loss) or changed."""
    m = 0.5
    head = ArcFace(3, 3, s=S, m=m).double()
    centers = _axes([1.0, 0.2, 0.0], [-0.3, 1.5, 0.4], [0.0, 0.0, 0.0])
    with torch.no_grad():
        head.weight.copy_(centers)
    embeddings = _axes([0.9, 0.5, -0.2], [0.1, 1.0, 0.7], [-0.4, 0.2, 1.0])
    labels = torch.tensor([0, 1, 0])

    x = embeddings.clone().requires_grad_(True)
    w = centers[:2].clone().requires_grad_(True)
    logits = []
    for i in range(3):
        xi = x[i] / x[i].norm()
        cos = [torch.dot(xi, w[k] / w[k].norm()) for k in range(2)]
        y = int(labels[i])
        cos[y] = torch.cos(torch.acos(cos[y]) + m)  # all targets well below theta + m = pi
        logits.append(torch.stack([S * cos[0], S * cos[1], torch.zeros((), dtype=F64)]))
    logits = torch.stack(logits)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    ref_x, ref_w = torch.autograd.grad(expected, (x, w))
    probs = torch.softmax(logits.detach(), 1)
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    zero_center_grad = (S / 3) * (probs[:, 2:3] * unit).sum(0) / 1e-12

    for loss, grad_x, grad_w in _both_paths(head, embeddings, labels):
        assert torch.isfinite(loss) and torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
        assert torch.allclose(grad_x, ref_x, rtol=0, atol=1e-9)
        assert torch.allclose(grad_w[:2], ref_w, rtol=0, atol=1e-9)
        assert torch.allclose(grad_w[2], zero_center_grad, rtol=1e-10, atol=0)


def test_zero_embedding():
    """Row 1's embedding is exactly zero: all its cosines are 0, so its loss is the closed form
    log(e^{-s sin m} + (C - 1)) + s sin m (target cos(pi/2 + m) = -sin m), it moves no center, and its own
    gradient is the convention's (1 / 1e-12) sum_k dL/dcos_1k w_hat_k with d cos(theta + m) / d cos = cos m
    at cos = 0. Catches the embedding-norm floor removed (NaN) or changed, and a zero row leaking gradient
    into the centers."""
    m, num_classes = 0.5, 4
    head = ArcFace(3, num_classes, s=S, m=m).double()
    centers = _axes([1.0, 0.2, 0.0], [-0.3, 1.5, 0.4], [0.5, -0.5, 2.0], [0.0, -1.0, -0.2])
    with torch.no_grad():
        head.weight.copy_(centers)
    embeddings = _axes([0.9, 0.5, -0.2], [0.0, 0.0, 0.0])
    labels = torch.tensor([0, 2])

    zero_row_loss = math.log(math.exp(-S * math.sin(m)) + num_classes - 1) + S * math.sin(m)
    x0 = embeddings[:1].clone().requires_grad_(True)
    w = centers.clone().requires_grad_(True)
    xi = x0[0] / x0[0].norm()
    cos = [torch.dot(xi, w[k] / w[k].norm()) for k in range(num_classes)]
    cos[0] = torch.cos(torch.acos(cos[0]) + m)
    row0_loss = torch.nn.functional.cross_entropy(S * torch.stack(cos).unsqueeze(0), labels[:1])
    expected = (row0_loss + zero_row_loss) / 2
    ref_x0, ref_w = torch.autograd.grad(expected, (x0, w))
    zero_logits = torch.zeros(num_classes, dtype=F64)
    zero_logits[2] = -S * math.sin(m)
    dcos = torch.softmax(zero_logits, 0) * S / 2
    dcos[2] = (dcos[2] - S / 2) * math.cos(m)
    zero_row_grad = (dcos[:, None] * centers / centers.norm(dim=1, keepdim=True)).sum(0) / 1e-12

    for loss, grad_x, grad_w in _both_paths(head, embeddings, labels):
        assert torch.isfinite(loss) and torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
        assert torch.allclose(grad_x[0], ref_x0[0], rtol=0, atol=1e-9)
        assert torch.allclose(grad_x[1], zero_row_grad, rtol=1e-10, atol=0)
        assert torch.allclose(grad_w, ref_w, rtol=0, atol=1e-9)
