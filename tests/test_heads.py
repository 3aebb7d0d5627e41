"""Classifier heads against closed-form references written independently here (float64).

Each reference builds the logits of every row element by element from the paper's / authors' formula
(the way pytorch-metric-learning checks its ArcFace), then -log softmax; autograd through the reference
gives the expected gradients w.r.t. embeddings and centers.
"""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace, CombinedMargin, CosFace
from methods.subcenter import SubCenterArcFace
from methods.margin_softmax import SoftmaxWorkspace, margin_softmax_cross_entropy
from methods.margins import ArcFaceRule, CosFaceRule, MVSoftmaxRule, NPCFaceRule, apply_rule, cosine_matrix
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace
from methods.registry import ConfigError


pytestmark = pytest.mark.usefixtures("float64_default")  # every tensor float64 unless a test says otherwise


def _unit(v):
    return v / v.norm()


def _cos_table(embeddings, weight):
    """cos[i][j] as a list of lists of 0-d tensors, computed pairwise."""
    return [[torch.clamp(torch.dot(_unit(embeddings[i]), _unit(weight[j])), -1.0, 1.0)
             for j in range(weight.shape[0])] for i in range(embeddings.shape[0])]


def _ce(rows, labels):
    losses = [torch.logsumexp(torch.stack(row), 0) - row[y] for row, y in zip(rows, labels.tolist())]
    return torch.stack(losses).mean()


def _arc_target(cos, m):
    """ArcFace's target cosine, with insightface's fallback past theta + m = pi."""
    theta = torch.acos(cos)
    return torch.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)


def reference_arcface(emb, w, labels, s, m):
    rows = []
    for i, row in enumerate(_cos_table(emb, w)):
        y = int(labels[i])
        rows.append([s * (_arc_target(c, m) if j == y else c) for j, c in enumerate(row)])
    return _ce(rows, labels)


def reference_combined(emb, w, labels, s, m1, m2, m3):
    rows = []
    for i, row in enumerate(_cos_table(emb, w)):
        y = int(labels[i])
        rows.append([s * (torch.cos(m1 * torch.acos(c) + m2) - m3 if j == y else c) for j, c in enumerate(row)])
    return _ce(rows, labels)


def reference_subcenter(emb, w, labels, s, m, k):
    table = _cos_table(emb, w)
    rows = []
    for i, row in enumerate(table):
        y = int(labels[i])
        per_class = [torch.stack(row[c * k:(c + 1) * k]).max() for c in range(len(row) // k)]
        rows.append([s * (_arc_target(cos, m) if c == y else cos) for c, cos in enumerate(per_class)])
    return _ce(rows, labels)


def reference_npcface(emb, w, labels, s, m, m0, m1, t, alpha):
    """FaceX-Zoo head/NPCFace.py, written out per element."""
    rows = []
    for i, row in enumerate(_cos_table(emb, w)):
        y = int(labels[i])
        cy = row[y]
        thr = cy * math.cos(m) - torch.sqrt(1 - cy ** 2) * math.sin(m)
        hard = [j for j, c in enumerate(row) if j != y and c > thr]
        mean = (sum(row[j].item() for j in hard) / len(hard)) if hard else 0.0
        new_m = m0 + m1 * mean
        out = []
        for j, c in enumerate(row):
            if j == y:
                c = torch.cos(torch.acos(cy) + new_m) if cy > 0 else cy
            elif j in hard:
                c = t * c + alpha
            out.append(s * c)
        rows.append(out)
    return _ce(rows, labels)


def reference_mv(emb, w, labels, s, m, t, variant="adaptive", base="am", target_condition="facexzoo"):
    """MV-Softmax per element: FaceX-Zoo head/MV_Softmax.py (adaptive, ``target_condition="facexzoo"``) and
    the SV-X-Softmax fc_layers.py alternatives (fixed weight ``cos + t``; margin where cos > 0 or always)."""
    rows = []
    for i, row in enumerate(_cos_table(emb, w)):
        y = int(labels[i])
        cy = row[y]
        f = cy - m if base == "am" else torch.cos(torch.acos(cy) + m)
        if target_condition == "always":
            target = f
        elif target_condition == "positive":
            target = f if cy > 0 else cy
        else:
            target = f if cy > (m if base == "am" else 0.0) else cy
        out = []
        for j, c in enumerate(row):
            if j == y:
                c = target
            elif c > f:
                c = (t + 1) * c + t if variant == "adaptive" else c + t
            out.append(s * c)
        rows.append(out)
    return _ce(rows, labels)


CASES = [
    ("arcface", lambda: ArcFace(6, 7, s=64.0, m=0.5), lambda e, w, y: reference_arcface(e, w, y, 64.0, 0.5)),
    ("cosface", lambda: CosFace(6, 7, s=30.0, m=0.35),
     lambda e, w, y: _ce([[30.0 * (c - 0.35 if j == int(y[i]) else c) for j, c in enumerate(row)]
                          for i, row in enumerate(_cos_table(e, w))], y)),
    ("combined-sphere-arc-cos", lambda: CombinedMargin(6, 7, s=32.0, m1=0.9, m2=0.4, m3=0.15),
     lambda e, w, y: reference_combined(e, w, y, 32.0, 0.9, 0.4, 0.15)),
    ("combined-default", lambda: CombinedMargin(6, 7),
     lambda e, w, y: reference_combined(e, w, y, 64.0, 1.0, 0.5, 0.0)),
    ("subcenter", lambda: SubCenterArcFace(6, 7, k=3, s=64.0, m=0.5),
     lambda e, w, y: reference_subcenter(e, w, y, 64.0, 0.5, 3)),
    ("npcface", lambda: NPCFace(6, 7), lambda e, w, y: reference_npcface(e, w, y, 32.0, 0.35, 0.4, 0.2, 1.1, 0.2)),
    ("mv-am", lambda: MVSoftmax(6, 7), lambda e, w, y: reference_mv(e, w, y, 32.0, 0.35, 0.12)),
    ("mv-arc", lambda: MVSoftmax(6, 7, m=0.5, t=0.2, base="arc"),
     lambda e, w, y: reference_mv(e, w, y, 32.0, 0.5, 0.2, base="arc")),
    ("mv-am-fixed-svx", lambda: MVSoftmax(6, 7, t=0.2, variant="fixed", target_condition="positive"),
     lambda e, w, y: reference_mv(e, w, y, 32.0, 0.35, 0.2, "fixed", "am", "positive")),
    ("mv-arc-fixed-always", lambda: MVSoftmax(6, 7, variant="fixed", base="arc", target_condition="always"),
     lambda e, w, y: reference_mv(e, w, y, 32.0, 0.35, 0.12, "fixed", "arc", "always")),
]


@pytest.mark.parametrize("name, make_head, reference", CASES, ids=[c[0] for c in CASES])
def test_head_matches_closed_form(name, make_head, reference):
    torch.manual_seed(3)
    head = make_head().double()
    with torch.no_grad():  # centers of a trained-looking scale, and embeddings near some of them
        head.weight.normal_()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 3])
    k = head.weight.shape[0] // 7
    embeddings = (head.weight.detach()[labels * k] + 0.9 * torch.randn(9, 6)).requires_grad_(True)
    loss = head(embeddings, labels)
    loss.backward()
    ref_emb = embeddings.detach().clone().requires_grad_(True)
    ref_w = head.weight.detach().clone().requires_grad_(True)
    expected = reference(ref_emb, ref_w, labels)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(embeddings.grad, ref_emb.grad, rtol=1e-8, atol=1e-11)
    assert torch.allclose(head.weight.grad, ref_w.grad, rtol=1e-8, atol=1e-11)


RULES = [ArcFaceRule(s=64.0, m=0.5), ArcFaceRule(s=64.0, m=0.5, straight_through=True),
         CosFaceRule(s=64.0, m=0.4), MVSoftmaxRule(s=32.0), MVSoftmaxRule(s=32.0, m=0.5, base="arc"),
         MVSoftmaxRule(s=32.0, variant="fixed", base="arc", target_condition="always"), NPCFaceRule(s=32.0)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r))
def test_fused_cross_entropy_matches_autograd_path(rule):
    """The fused loss and its hand-written backward equal plain autograd over apply_rule."""
    torch.manual_seed(0)
    centers = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    embeddings = (centers.detach()[labels] + torch.randn(12, 16)).requires_grad_(True)
    fused = margin_softmax_cross_entropy(embeddings, centers, labels, rule)
    g_emb, g_cen = torch.autograd.grad(fused, (embeddings, centers))
    plain = torch.nn.functional.cross_entropy(apply_rule(cosine_matrix(embeddings, centers), labels, rule), labels)
    p_emb, p_cen = torch.autograd.grad(plain, (embeddings, centers))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(g_emb, p_emb, atol=1e-12) and torch.allclose(g_cen, p_cen, atol=1e-12)


def test_fused_cross_entropy_passes_gradcheck():
    """Numerical differentiation as an independent check of the hand-written backward."""
    torch.manual_seed(1)
    embeddings = torch.randn(5, 4, requires_grad=True)
    centers = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 2, 5, 1, 2])
    # NPCFace is left out on purpose: its margin m' depends on the hard negatives' cosines without
    # gradient (as the authors compute it), so finite differences see a path the analytic gradient omits.
    for rule in (ArcFaceRule(s=8.0, m=0.3), MVSoftmaxRule(s=4.0), MVSoftmaxRule(s=4.0, base="arc"),
                 MVSoftmaxRule(s=4.0, variant="fixed")):
        assert torch.autograd.gradcheck(
            lambda e, c: margin_softmax_cross_entropy(e, c, labels, rule), (embeddings, centers))
    assert torch.autograd.gradcheck(
        lambda e, c: margin_softmax_cross_entropy(e, c, labels, CosFaceRule(s=4.0, m=0.2), filter_threshold=0.3),
        (embeddings, centers))


def test_inter_class_filtering_zeroes_value_and_gradient():
    torch.manual_seed(2)
    centers = torch.randn(10, 8, requires_grad=True)
    labels = torch.tensor([1, 4, 7])
    embeddings = (centers.detach()[[1, 4, 7]] + centers.detach()[[2, 2, 2]]).requires_grad_(True)
    rule = CosFaceRule(s=16.0, m=0.4)
    loss = margin_softmax_cross_entropy(embeddings, centers, labels, rule, filter_threshold=0.3)
    # reference: cosines above 0.3 off the target become the constant 0
    cos = cosine_matrix(embeddings, centers)
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[torch.arange(3), labels] = True
    filtered = (cos > 0.3) & ~target
    assert filtered.any()
    cos_ref = torch.where(filtered, torch.zeros_like(cos), cos)
    expected = torch.nn.functional.cross_entropy(apply_rule(cos_ref, labels, rule), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    g = torch.autograd.grad(loss, centers)[0]
    g_ref = torch.autograd.grad(expected, centers)[0]
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_head_validation_errors():
    with pytest.raises(ConfigError, match="NPCFace: need"):
        NPCFace(4, 3, t=0.0)
    with pytest.raises(ConfigError, match="MVSoftmax: need"):
        MVSoftmax(4, 3, t=-1.0)
    for key in ("variant", "base", "target_condition"):  # a typo must not silently pick a branch
        with pytest.raises(ConfigError, match=f"MVSoftmax: {key} must be one of"):
            MVSoftmax(4, 3, **{key: "am-softmax"})
    with pytest.raises(ConfigError, match="CombinedMargin: need"):
        CombinedMargin(4, 3, m1=0.0)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        SubCenterArcFace(4, 3, k=0)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        ArcFace(4, 1)


def test_subcenter_weight_layout():
    head = SubCenterArcFace(5, 4, k=3)
    assert head.weight.shape == (12, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[2 * 3 + 1] = torch.tensor([1.0, 0, 0, 0, 0])  # sub-center 1 of class 2
        head.weight[[0, 3, 9]] = torch.tensor([0, 1.0, 0, 0, 0])
    cos = head.class_cosines(torch.tensor([[1.0, 0, 0, 0, 0]]))
    assert cos.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def _plain_loss_and_grads(embeddings, centers, labels, rule):
    """Plain autograd over apply_rule: the independent reference of the fused loss."""
    e, c = embeddings.detach().requires_grad_(True), centers.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(apply_rule(cosine_matrix(e, c), labels, rule), labels)
    return (loss, *torch.autograd.grad(loss, (e, c)))


def test_center_gradient_is_right_in_every_row_chunk():
    """Catches: the chunked product + Jacobian of the centers' gradient going wrong past the first chunk
    (2,500 centers span three 1,024-row chunks, the last one partial)."""
    torch.manual_seed(3)
    centers = (torch.randn(2500, 8) * torch.rand(2500, 1) * 3).requires_grad_(True)  # unequal norms
    labels = torch.randint(0, 2500, (6,))
    embeddings = (centers.detach()[labels] + torch.randn(6, 8)).requires_grad_(True)
    rule = ArcFaceRule(s=16.0, m=0.5)
    fused = margin_softmax_cross_entropy(embeddings, centers, labels, rule)
    g_emb, g_cen = torch.autograd.grad(fused, (embeddings, centers))
    loss, p_emb, p_cen = _plain_loss_and_grads(embeddings, centers, labels, rule)
    assert fused.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(g_emb, p_emb, atol=1e-12) and torch.allclose(g_cen, p_cen, atol=1e-12)


def test_workspace_is_reused_and_changes_no_result():
    """Catches: a workspace that corrupts a later step (stale values in the reused blocks), and one that
    allocates afresh every step (the page faults item 7 of issue 14 removed)."""
    torch.manual_seed(4)
    workspace, rule = SoftmaxWorkspace(), MVSoftmaxRule(s=16.0)
    pointers = []
    for step in range(3):
        centers = torch.randn(1500, 8, requires_grad=True)
        labels = torch.randint(0, 1500, (10,))
        embeddings = (centers.detach()[labels] + torch.randn(10, 8)).requires_grad_(True)
        loss = margin_softmax_cross_entropy(embeddings, centers, labels, rule, workspace=workspace)
        loss.backward()
        pointers.append(centers.grad.data_ptr())
        ref_loss, ref_emb, ref_cen = _plain_loss_and_grads(embeddings, centers, labels, rule)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12), step
        assert torch.allclose(embeddings.grad, ref_emb, atol=1e-12), step
        assert torch.allclose(centers.grad, ref_cen, atol=1e-12), step
        centers.grad = None
    assert len(set(pointers)) == 1  # every step's center gradient in the same block


def test_workspace_two_forwards_before_backward_keep_their_own_buffers():
    """Catches: the second forward writing its logits over the first one's saved probabilities."""
    torch.manual_seed(5)
    workspace, rule = SoftmaxWorkspace(), CosFaceRule(s=16.0, m=0.3)
    centers = torch.randn(50, 8)
    inputs = [(torch.randn(7, 8, requires_grad=True), torch.randint(0, 50, (7,))) for _ in range(2)]
    losses = [margin_softmax_cross_entropy(e, centers, y, rule, workspace=workspace) for e, y in inputs]
    for loss, (embeddings, labels) in zip(losses, inputs):
        (grad,) = torch.autograd.grad(loss, embeddings)
        ref_loss, ref_emb, _ = _plain_loss_and_grads(embeddings, centers, labels, rule)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert torch.allclose(grad, ref_emb, atol=1e-12)


def test_workspace_refuses_a_second_backward_through_one_graph():
    """Catches: a silent wrong gradient when a graph whose probabilities were overwritten in place is
    back-propagated again (retain_graph)."""
    embeddings = torch.randn(4, 8, requires_grad=True)
    loss = margin_softmax_cross_entropy(embeddings, torch.randn(20, 8), torch.tensor([0, 1, 2, 3]),
                                        CosFaceRule(s=8.0, m=0.2), workspace=SoftmaxWorkspace())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
