"""Each margin head's loss and gradients on CUDA equal its CPU values in float32 (issue 19).

The heads of :mod:`methods.arcface` (ArcFace, CosFace, combined margin, sub-center ArcFace), NPCFace,
MV-Softmax and Partial FC at sample rate 1.0 (every center, so no sampling randomness) are built twice
from one seed, once on the CPU and once on the device, and fed the same embeddings and labels. The CPU is
the reference: the loss must agree to a relative 1e-4, and the gradients with respect to the embeddings
and to the class centers (Partial FC's sparse update: ``active_weight``, the rows it sampled) must agree
elementwise within 1e-4 of the largest reference gradient entry (``rtol = 1e-4`` with that ``atol``, so
that entries near zero are not held to a relative bound). Float32 throughout: CUDA matrix products do
not use TF32 by default (``torch.backends.cuda.matmul.allow_tf32`` is False; the value is recorded).

What it catches: a CUDA-only path that differs from the CPU one (a margin applied twice or not at all,
a mask or a hard-negative statistic computed in another precision, a fused kernel with another formula,
a sub-center max or a Partial FC remapping that depends on the device).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from methods.arcface import ArcFace, CombinedMargin, CosFace
from methods.subcenter import SubCenterArcFace
from methods.mv_softmax import MVSoftmax
from methods.npcface import NPCFace
from methods.partial_fc import PartialFC
from tests.gpu.gpu_settings import GpuSizes

RELATIVE_TOLERANCE = 1e-4
HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "arcface": ArcFace, "cosface": CosFace, "combined": CombinedMargin, "subcenter": SubCenterArcFace,
    "npcface": NPCFace, "mvsoftmax": MVSoftmax,
    "pfc-1.0": lambda embedding_size, num_classes: PartialFC(embedding_size, num_classes, sample_rate=1.0),
}


def _loss_and_grads(build: Callable[[int, int], nn.Module], sizes: GpuSizes, embeddings: torch.Tensor,
                    labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The head's loss and gradients on ``device`` (returned on the CPU), built from seed 0."""
    torch.manual_seed(0)
    head = build(sizes.embedding_size, sizes.head_classes).to(device)
    x = embeddings.to(device).requires_grad_(True)
    loss = head(x, labels.to(device))
    loss.backward()
    grads = {"embeddings": x.grad}
    grads.update({name: p.grad for name, p in head.named_parameters() if p.grad is not None})
    return loss.detach().cpu(), {name: g.detach().cpu() for name, g in grads.items()}


@pytest.mark.parametrize("name", HEADS)
def test_head_on_device_equals_cpu(name: str, device: torch.device, sizes: GpuSizes, record) -> None:
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(sizes.head_batch, sizes.embedding_size, generator=generator)
    labels = torch.randint(0, sizes.head_classes, (sizes.head_batch,), generator=generator)
    cpu_loss, cpu_grads = _loss_and_grads(HEADS[name], sizes, embeddings, labels, torch.device("cpu"))
    dev_loss, dev_grads = _loss_and_grads(HEADS[name], sizes, embeddings, labels, device)
    errors = {key: float((dev_grads[key] - grad).abs().max() / grad.abs().max()) for key, grad in cpu_grads.items()
              if key in dev_grads}
    record(f"heads/{name}", {"loss_cpu": float(cpu_loss), "loss_device": float(dev_loss),
                             "loss_relative_error": float((dev_loss - cpu_loss).abs() / cpu_loss.abs()),
                             "grad_max_error_over_max_grad": errors,
                             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})

    assert set(dev_grads) == set(cpu_grads), "the same parameters must receive gradients on both devices"
    assert set(cpu_grads) - {"embeddings"}, f"{name}: no class-center gradient"
    torch.testing.assert_close(dev_loss, cpu_loss, rtol=RELATIVE_TOLERANCE, atol=0.0)
    for key, grad in cpu_grads.items():
        torch.testing.assert_close(dev_grads[key], grad, rtol=RELATIVE_TOLERANCE,
                                   atol=RELATIVE_TOLERANCE * float(grad.abs().max()), msg=lambda m: f"{key}: {m}")
