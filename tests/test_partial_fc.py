"""Partial FC: r = 1 equals the full head; r < 1 equals a plain float64 reference over the sampled columns;
sampling keeps every positive; sparse updates touch only the sampled rows (weights and optimizer state
bitwise unchanged elsewhere; SGD's momentum and Adam's per-row moments and step counts against independent
per-row optimizers); dense updates move every row."""

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


ADAM_VARIANTS = [(torch.optim.AdamW, {"weight_decay": 0.1}), (torch.optim.Adam, {"weight_decay": 1e-2}),
                 (torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True})]


@pytest.mark.parametrize("optimizer_cls, options", ADAM_VARIANTS)
def test_sparse_adam_keeps_each_rows_own_state(optimizer_cls, options):
    """Sparse update with Adam / AdamW (issue 16: it crashed with ``KeyError: 'step'``). Independent
    reference: every class center is a parameter of its own with its own torch optimizer, stepped only at
    the steps where the center was sampled, with the gradient the head gave its column. After each step
    the head's centers, moments and per-row step counts equal the reference's (1e-12, float64), and the
    rows not sampled (weights and state) are bitwise unchanged. Catches: a global step count in the bias
    corrections (insightface v1 PartialFCAdamW), moments or decay reaching rows not sampled, state
    written back to the wrong rows, and Adam's L2 decay confused with AdamW's decoupled decay."""
    torch.manual_seed(8)
    num_classes = 40
    head = PartialFC(8, num_classes, sample_rate=0.2)
    optimizer = optimizer_cls([head.active_weight], lr=0.01, **options)
    head.attach_optimizer(optimizer)
    rows = [torch.nn.Parameter(head.weight[c].clone()) for c in range(num_classes)]
    reference = [optimizer_cls([row], lr=0.01, **options) for row in rows]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))  # lr read per step
    for step in range(6):
        labels = torch.randint(0, num_classes, (6,))
        before = {name: value.clone() for name, value in head.state_dict().items() if torch.is_tensor(value)}
        optimizer.zero_grad()
        head(torch.randn(6, 8), labels).backward()
        sampled, grad = head.sampled_classes.clone(), head.active_weight.grad.clone()
        optimizer.step()
        head.step_end()
        schedule.step()
        for column, center in enumerate(sampled.tolist()):
            rows[center].grad = grad[column].clone()
            for group in reference[center].param_groups:
                group["lr"] = 0.01 / (1 + step)
            reference[center].step()
        untouched = torch.ones(num_classes, dtype=torch.bool)
        untouched[sampled] = False
        for name in ("weight", "row_state_exp_avg", "row_state_exp_avg_sq", "row_state_step"):
            assert torch.equal(getattr(head, name)[untouched], before[name][untouched]), name
        torch.testing.assert_close(head.weight, torch.stack([row.detach() for row in rows]), rtol=0, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if options.get("amsgrad") else ())):
            expected = torch.stack([ref.state[row][key] if ref.state[row] else torch.zeros(8)
                                    for ref, row in zip(reference, rows)])
            torch.testing.assert_close(getattr(head, f"row_state_{key}"), expected, rtol=0, atol=1e-12)
        steps = [int(ref.state[row]["step"]) if ref.state[row] else 0 for ref, row in zip(reference, rows)]
        assert head.row_state_step.tolist() == steps
    assert len(set(steps)) > 1  # the rows were sampled at different rates: the per-row counts mattered


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_sparse_at_rate_one_steps_like_dense(optimizer_cls):
    """At r = 1 every center is sampled every step, so the sparse update's per-row state must reproduce
    torch's own optimizer on the dense weight: the per-row Adam arithmetic (and SGD's swapped momentum)
    against torch's implementation, over 4 steps with weight decay. Catches an off-by-one in the per-row
    step count, a missing or doubled weight decay, and bias corrections that differ from torch's."""
    torch.manual_seed(9)
    sparse = PartialFC(8, 20, sample_rate=1.0, update="sparse")
    dense = PartialFC(8, 20, sample_rate=1.0, update="dense")
    with torch.no_grad():
        dense.weight.copy_(sparse.weight)
    options = {"lr": 0.05, "weight_decay": 0.1} | ({"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {})
    optimizers = [optimizer_cls([head.active_weight if head is sparse else head.weight], **options)
                  for head in (sparse, dense)]
    sparse.attach_optimizer(optimizers[0])
    for _ in range(4):
        x, labels = torch.randn(6, 8), torch.randint(0, 20, (6,))
        for head, optimizer in zip((sparse, dense), optimizers):
            optimizer.zero_grad()
            head(x, labels).backward()
            optimizer.step()
            head.step_end()
    torch.testing.assert_close(sparse.weight, dense.weight.detach(), rtol=0, atol=1e-12)


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


def test_active_weight_holds_exactly_the_sampled_centers():
    """Catches: ``active_weight`` holding other rows than the sampled classes' centers (a stale or shifted
    gather, a wrong slice of the reused workspace), a sample that drops a positive or has the wrong size,
    and columns in another order than the one the labels were remapped to. The columns are the sampled
    class ids in increasing order (insightface partial_fc_v2.py sorts the top-k indices and remaps the
    labels with searchsorted), so a label's column holds its own center. With r < 1 the loss only ever
    sees ``[B, K]`` logits: K = ceil(r * C), not C."""
    torch.manual_seed(5)
    head = PartialFC(4, 10_000, sample_rate=0.01)
    labels = torch.tensor([17, 9_999, 17, 0, 512, 4_096, 2, 511])
    for step in range(3):  # the reused workspace must hold each step's own rows
        head(torch.randn(8, 4), labels).backward()
        sampled = head.sampled_classes
        assert sampled.numel() == 100 and torch.all(sampled[1:] > sampled[:-1])
        assert set(labels.tolist()) <= set(sampled.tolist())
        assert torch.equal(head.active_weight.detach(), head.weight[sampled])
        assert head.active_weight.grad.shape == (100, 4)
        columns = [sampled.tolist().index(label) for label in labels.tolist()]  # the remapped labels
        assert torch.equal(head.active_weight.detach()[columns], head.weight[labels])
        head.step_end()
        labels = torch.randint(0, 10_000, (8,))


def _reference_loss(x: torch.Tensor, centers: torch.Tensor, columns: list[int], margin: str, s: float,
                    m: float) -> torch.Tensor:
    """The margin softmax written plainly, sample by sample: cosines to the given centers, the target
    column's cosine replaced by CosFace's ``cos - m`` or ArcFace's ``cos(theta + m)``, scaled by ``s``,
    then cross-entropy averaged over the batch."""
    losses = []
    for i, column in enumerate(columns):
        cosines = torch.stack([torch.dot(x[i], center) / (x[i].norm() * center.norm()) for center in centers])
        target = cosines[column] - m if margin == "cosface" else torch.cos(torch.acos(cosines[column]) + m)
        logits = s * torch.cat([cosines[:column], target.reshape(1), cosines[column + 1:]])
        losses.append(torch.logsumexp(logits, dim=0) - logits[column])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("margin", ["cosface", "arcface"])
def test_sampled_softmax_against_a_plain_reference(margin, update):
    """r < 1 against an independent float64 reference: it gathers the sampled columns itself (from the class
    ids the head reports), finds each label's column by searching that list, and computes the margin softmax
    by hand. Loss, embedding gradient and the sampled centers' gradient must agree (1e-10); the dense
    update's gradient must be zero on every center not sampled. Catches: a label remapped to the wrong
    column (the loss would use another center as the target), a margin applied to the wrong column, a
    gradient scattered to the wrong rows, and logits over centers that were not sampled."""
    torch.manual_seed(7)
    s, m = 64.0, (0.4 if margin == "cosface" else 0.5)
    head = PartialFC(8, 60, sample_rate=0.2, margin=margin, update=update)
    labels = torch.tensor([3, 41, 3, 17, 59, 0, 22, 41])
    x = (head.weight.detach()[labels] * 40 + torch.randn(8, 8)).requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    sampled = head.sampled_classes.tolist()
    assert len(sampled) == 12 and set(labels.tolist()) <= set(sampled)

    x_ref = x.detach().clone().requires_grad_(True)
    centers_ref = head.weight.detach()[sampled].clone().requires_grad_(True)
    columns = [sampled.index(label) for label in labels.tolist()]
    if margin == "arcface":  # the plain formula has no theta + m > pi fallback: stay where none applies
        cos_y = torch.nn.functional.cosine_similarity(x_ref.detach(), centers_ref.detach()[columns])
        assert torch.all(torch.acos(cos_y) + m < math.pi)
    reference = _reference_loss(x_ref, centers_ref, columns, margin, s, m)
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    if update == "sparse":
        torch.testing.assert_close(head.active_weight.grad, centers_ref.grad, rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(head.weight.grad[sampled], centers_ref.grad, rtol=0, atol=1e-10)
        unsampled = torch.ones(60, dtype=torch.bool)
        unsampled[sampled] = False
        assert torch.all(head.weight.grad[unsampled] == 0)


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
