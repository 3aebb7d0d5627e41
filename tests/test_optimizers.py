"""Every registered method trains with every optimizer of ``train.optimizer`` through the harness's Trainer
(issue 16): Partial FC's sparse update crashed on AdamW's first step (``KeyError: 'step'``), and nothing
ran a method with anything but SGD.

For each method of the registry (Partial FC with both updates) and each optimizer: two steps of the
harness's Trainer on the tiny backbone of the method tests, CPU; the loss is finite, and every trainable
parameter that received a non-zero gradient moved. Partial FC's centers are buffers under the sparse update
(only the sampled ones move, their state too), so they are checked row by row, and under AdamW the first
step of the sampled rows is checked against Adam's closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.config import OPTIMIZER_DEFAULTS, TrainSettings
from bench.train import OPTIMIZERS, Trainer, lr_factor
from methods.base import METHODS, Method
from tests.method_helpers import BATCH, EMBEDDING, IMAGE, NUM_CLASSES, build_tiny

STEPS = 2
#: (case label, registered method, parameters): every registered method, Partial FC with both updates and a
#: sample rate that leaves centers out of the sample.
CASES = [(name, name, {}) for name in METHODS.names() if name != "pfc"] + [
    ("pfc-sparse", "pfc", {"update": "sparse", "sample_rate": 0.5}),
    ("pfc-dense", "pfc", {"update": "dense", "sample_rate": 0.5})]


def _settings(optimizer: str) -> TrainSettings:
    return TrainSettings(batch_size=BATCH, budget=BATCH * STEPS, embedding_size=EMBEDDING, amp=False,
                         device="cpu", optimizer=optimizer)


def _batch(method: Method, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``BATCH`` images, ``views_per_class`` of each identity side by side, identities varying by step."""
    views = method.batch_spec.views_per_class
    labels = (torch.arange(BATCH // views) + 3 * step).repeat_interleave(views) % NUM_CLASSES
    generator = torch.Generator().manual_seed(step)
    return torch.randn(labels.shape[0], 3, IMAGE, IMAGE, generator=generator), labels


def test_every_optimizer_has_a_builder_and_defaults():
    """Catches a ``train.optimizer`` value the config accepts but the trainer cannot build (or the reverse)."""
    assert set(OPTIMIZERS) == set(OPTIMIZER_DEFAULTS) == {"sgd", "adamw"}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_DEFAULTS))
@pytest.mark.parametrize("label, name, params", CASES, ids=[case[0] for case in CASES])
def test_every_method_trains_with_every_optimizer(label, name, params, optimizer):
    """Catches: an optimizer a method's optimizer coupling cannot take (Partial FC's sparse hooks with
    AdamW), a NaN loss, and parameters that get a gradient but no update (a group the optimizer skips)."""
    method = build_tiny(name, params)
    trainer = Trainer(method, _settings(optimizer), torch.device("cpu"), total_steps=STEPS)
    for step in range(STEPS):
        images, labels = _batch(method, step)
        loss, _ = trainer.forward_backward(images, labels)
        assert torch.isfinite(loss), (label, step)
        transient = getattr(getattr(method, "head", None), "active_weight", None)  # checked row by row below
        moved = {p: p.detach().clone() for p in method.parameters()
                 if p.requires_grad and p is not transient and p.grad is not None and p.grad.abs().sum() > 0}
        centers = _sparse_centers_before(method)
        trainer.update()
        assert moved, label
        for parameter, before in moved.items():
            assert not torch.equal(parameter.detach(), before), (label, step, tuple(parameter.shape))
        if centers is not None:
            _check_sparse_centers(method, centers, optimizer, trainer, step)


def _sparse_centers_before(method: Method) -> dict[str, torch.Tensor] | None:
    """Partial FC sparse: the centers, the sampled classes and their gradient before the optimizer step."""
    head = getattr(method, "head", None)
    if getattr(head, "update", None) != "sparse":
        return None
    return {"weight": head.weight.clone(), "sampled": head.sampled_classes.clone(),
            "grad": head.active_weight.grad.clone()}


def _check_sparse_centers(method: Method, before: dict[str, torch.Tensor], optimizer: str, trainer: Trainer,
                          step: int) -> None:
    """The sampled centers moved and the others did not (bitwise); under AdamW, the first step of the
    sampled rows is Adam's closed form: ``m_hat = g``, ``v_hat = g^2``, so
    ``w <- w (1 - lr wd) - lr g / (|g| + eps)`` with the step's scheduled lr."""
    head, settings = method.head, trainer.settings
    sampled = before["sampled"]
    untouched = torch.ones(head.num_classes, dtype=torch.bool)
    untouched[sampled] = False
    assert untouched.any() and torch.equal(head.weight[untouched], before["weight"][untouched])
    assert not torch.equal(head.weight[sampled], before["weight"][sampled])
    if optimizer != "adamw" or step != 0:
        return
    lr = settings.lr * lr_factor(0, int(settings.warmup_fraction * STEPS), STEPS, settings.lr_power)
    grad = before["grad"]
    expected = (before["weight"][sampled] * (1 - lr * settings.weight_decay)
                - lr * grad / (grad.abs() + settings.eps))
    torch.testing.assert_close(head.weight[sampled], expected, rtol=1e-5, atol=1e-7)
    assert head.row_state_step[sampled].tolist() == [1] * sampled.numel()
    assert int(head.row_state_step[untouched].abs().sum()) == 0
    torch.testing.assert_close(head.row_state_exp_avg[sampled], (1 - settings.betas[0]) * grad)


def test_adamw_defaults_reach_the_optimizer():
    """The harness builds AdamW with insightface's ViT-config values (lr 1e-3, weight decay 0.1) and torch's
    betas and eps, the same for every parameter group. Catches a builder that ignores a setting."""
    method = build_tiny("pfc", {"update": "dense"})
    optimizer = Trainer(method, _settings("adamw"), torch.device("cpu"), total_steps=STEPS).optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert math.isclose(group["initial_lr"], 1e-3) and group["weight_decay"] == 0.1
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and not group["amsgrad"]
