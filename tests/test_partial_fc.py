"""Partial FC: r = 1 equals the full head; sampling keeps every positive; sparse updates touch only the
sampled rows (weights and momentum bitwise unchanged elsewhere); dense updates move every row."""

from __future__ import annotations

import math

import pytest
import torch

from methods.arcface import ArcFace, CosFace
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace
from methods.partial_fc import PartialFC, sample_centers
from methods.registry import ConfigError, UnknownNameError


pytestmark = pytest.mark.usefixtures("float64_default")  # every tensor float64 unless a test says otherwise


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("margin, full_head", [
    ("arcface", lambda: ArcFace(8, 30)), ("cosface", lambda: CosFace(8, 30)),
    ("npcface", lambda: NPCFace(8, 30)), ("mvsoftmax", lambda: MVSoftmax(8, 30)),
])
def test_sample_rate_one_equals_the_full_head(margin, full_head, update):
    torch.manual_seed(0)
    full = full_head()
    pfc = PartialFC(8, 30, sample_rate=1.0, margin=margin, update=update)
    with torch.no_grad():
        pfc.weight.copy_(full.weight)
    labels = torch.tensor([0, 3, 5, 7, 29, 3, 11, 12])
    x_full = (full.weight.detach()[labels] * 50 + torch.randn(8, 8)).requires_grad_(True)
    x_pfc = x_full.detach().clone().requires_grad_(True)
    loss_full, loss_pfc = full(x_full, labels), pfc(x_pfc, labels)
    loss_full.backward()
    loss_pfc.backward()
    center_grad = pfc.active_weight.grad if update == "sparse" else pfc.weight.grad
    assert loss_pfc.item() == pytest.approx(loss_full.item(), rel=1e-12)
    assert torch.allclose(x_pfc.grad, x_full.grad, atol=1e-12)
    assert torch.allclose(center_grad, full.weight.grad, atol=1e-12)


def test_sparse_gradients_accumulate_over_two_backward_passes():
    """Catches: the second backward pass writing the centers' gradient into the reused block that already
    holds the first one's (giving twice the second gradient instead of the sum)."""
    torch.manual_seed(6)
    head = PartialFC(8, 30, sample_rate=1.0)
    batches = [(torch.randn(6, 8), torch.randint(0, 30, (6,))) for _ in range(2)]
    separate = []
    for x, y in batches:
        head(x, y).backward()
        separate.append(head.active_weight.grad.clone())
        head.step_end()
    for x, y in batches:
        head(x, y).backward()
    assert torch.allclose(head.active_weight.grad, separate[0] + separate[1], atol=1e-12)


def test_sampling_keeps_every_positive_and_exact_count():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        labels = torch.randint(0, 1000, (64,), generator=generator)
        index, local = sample_centers(labels, 1000, math.ceil(0.1 * 1000), generator)
        assert index.numel() == 100
        assert torch.all(index[1:] > index[:-1])                        # sorted, no duplicates
        assert torch.equal(index[local], labels)                         # labels remapped into the sample
        assert set(labels.tolist()) <= set(index.tolist())               # every positive kept
    # more positives than the sample size: exactly the positives
    labels = torch.arange(0, 300, 2)
    index, local = sample_centers(labels, 1000, 100, generator)
    assert torch.equal(index, labels) and torch.equal(local, torch.arange(150))


def test_negatives_are_uniform():
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(50)
    labels = torch.tensor([0, 1])
    trials = 4000
    for _ in range(trials):
        index, _ = sample_centers(labels, 50, 10, generator)
        counts[index] += 1
    assert counts[0] == trials and counts[1] == trials
    # each of the 48 negatives is drawn with probability 8/48; 4000 trials: sd ~ 23.6
    assert torch.all((counts[2:] - trials * 8 / 48).abs() < 6 * 23.6)


def _sgd_reference_step(w, buf, grad, lr, momentum, wd):
    g = grad + wd * w
    buf = g.clone() if buf is None else momentum * buf + g
    return w - lr * buf, buf


def test_sparse_update_touches_only_sampled_rows_bitwise():
    torch.manual_seed(2)
    head = PartialFC(8, 200, sample_rate=0.1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    head.attach_optimizer(opt)
    weight_ref = head.weight.clone()
    momentum_ref = torch.zeros_like(weight_ref)
    for step in range(4):
        labels = torch.randint(0, 200, (16,))
        before_w, before_m = head.weight.clone(), head.row_state_momentum_buffer.clone()
        opt.zero_grad()
        head(torch.randn(16, 8), labels).backward()
        index, grad = head._index.clone(), head.active_weight.grad.clone()
        opt.step()
        head.step_end()
        after_m = head.row_state_momentum_buffer
        untouched = torch.ones(200, dtype=torch.bool)
        untouched[index] = False
        assert index.numel() == 20 and untouched.sum() == 180
        assert torch.equal(head.weight[untouched], before_w[untouched])      # bitwise
        assert torch.equal(after_m[untouched], before_m[untouched])          # momentum bitwise
        # sampled rows follow SGD with momentum and weight decay, row by row
        new_rows, new_buf = _sgd_reference_step(weight_ref[index], momentum_ref[index], grad, 0.1, 0.9, 5e-4)
        weight_ref[index], momentum_ref[index] = new_rows, new_buf
        assert torch.allclose(head.weight, weight_ref, atol=1e-15)
        assert torch.allclose(after_m, momentum_ref, atol=1e-15)


def test_dense_update_moves_every_row():
    torch.manual_seed(3)
    head = PartialFC(8, 200, sample_rate=0.1, update="dense")
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = head.weight.detach().clone()
    opt.zero_grad()
    head(torch.randn(16, 8), torch.randint(0, 200, (16,))).backward()
    opt.step()
    assert (head.weight.detach() != before).all(dim=1).all()  # weight decay reaches every row


def test_state_dict_resumes_sampling_and_momentum():
    torch.manual_seed(4)
    head = PartialFC(8, 100, sample_rate=0.2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head.attach_optimizer(opt)
    labels = torch.randint(0, 100, (10,))
    for _ in range(2):
        opt.zero_grad(); head(torch.randn(10, 8), labels).backward(); opt.step(); head.step_end()
    state = head.state_dict()
    assert "active_weight" not in state
    clone = PartialFC(8, 100, sample_rate=0.2)
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    clone.attach_optimizer(clone_opt)
    clone.load_state_dict(state)
    x = torch.randn(10, 8)
    for model, optimizer in ((head, opt), (clone, clone_opt)):
        optimizer.zero_grad(); model(x, labels).backward(); optimizer.step(); model.step_end()
    assert torch.equal(head.weight, clone.weight)


def test_logits_are_never_batch_by_classes():
    """With r < 1 the loss only ever sees [B, K] logits: check via the sampled set size."""
    head = PartialFC(4, 10_000, sample_rate=0.01)
    head(torch.randn(8, 4), torch.randint(0, 10_000, (8,))).backward()
    assert head.active_weight.shape == (100, 4) and head.active_weight.grad.shape == (100, 4)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="sample_rate must be in"):
        PartialFC(4, 10, sample_rate=0.0)
    with pytest.raises(UnknownNameError, match="unknown Partial FC margin 'sphereface'; valid: arcface, combined"):
        PartialFC(4, 10, margin="sphereface")
    with pytest.raises(ConfigError, match="Partial FC margin 'cosface': unknown parameter 'k'"):
        PartialFC(4, 10, margin="cosface", margin_params={"k": 3})
    with pytest.raises(ConfigError, match="update must be"):
        PartialFC(4, 10, update="lazy")
    head = PartialFC(4, 10)
    with pytest.raises(ConfigError, match="supports SGD, Adam, AdamW"):
        head.attach_optimizer(torch.optim.RMSprop(head.parameters()))


def test_subcenter_is_not_a_partial_fc_margin():
    """README (Methods, ``pfc``): Partial FC takes every margin head's rule except sub-center's. Catches a
    silent acceptance of ``margin="subcenter"`` (its max over sub-centers has no rule Partial FC could
    apply), and a README list that drifts from the registry of margins."""
    from methods.partial_fc import PFC_MARGINS

    assert PFC_MARGINS.names() == ["arcface", "combined", "cosface", "mvsoftmax", "npcface"]
    with pytest.raises(UnknownNameError, match="unknown Partial FC margin 'subcenter'"):
        PartialFC(4, 10, margin="subcenter")


def test_margin_params_reach_the_rule():
    head = PartialFC(4, 10, margin="cosface", margin_params={"m": "0.35", "s": 30})
    assert head.rule.m == 0.35 and head.rule.s == 30.0
