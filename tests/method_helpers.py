"""Shared pieces of the method tests (DCQ, SST, MASST, Prototype Memory): a tiny backbone, batches of
``views`` images per identity side by side, the harness's SGD, and a plain training loop (the fixture
``one_thread`` they use is in conftest.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

from bench.backbones import build_backbone
from methods.base import Method, MethodContext, build_method

#: BATCH: the images per step the methods are built for (4 identities x 2 views, as :func:`view_batch`).
NUM_CLASSES, EMBEDDING, IMAGE, BATCH = 12, 16, 16, 8


def tiny_context(num_classes: int = NUM_CLASSES, batch_size: int = BATCH, steps: int = 10) -> MethodContext:
    """The run shape the method tests build for (one process)."""
    return MethodContext(num_classes, EMBEDDING, batch_size, steps)


def build_tiny(name: str, cfg: dict | None = None, seed: int = 0, num_classes: int = NUM_CLASSES,
               batch_size: int = BATCH) -> Method:
    """Method ``name`` over a ``small`` backbone of EMBEDDING dims for IMAGE x IMAGE inputs, seeded, for
    batches of ``batch_size`` images."""
    torch.manual_seed(seed)
    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    return build_method(name, backbone, tiny_context(num_classes, batch_size), cfg)


def view_batch(identities: list[int], views: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images, ``views`` per identity side by side, with their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(identities).repeat_interleave(views)
    return torch.randn(labels.shape[0], 3, IMAGE, IMAGE, generator=generator), labels


def harness_sgd(method: Method) -> torch.optim.Optimizer:
    """The harness's optimizer settings (bench.config.TrainSettings defaults)."""
    return torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def train_steps(method: Method, optimizer: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """One optimizer step per batch, with the method's end-of-step hook; returns the losses."""
    losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        out = method(images, labels)
        out.loss.backward()
        optimizer.step()
        method.on_step_end()
        losses.append(out.loss.item())
    return losses


def assert_state_dict_resumes_identically(build: Callable[[int], Method],
                                          batches: list[tuple[torch.Tensor, torch.Tensor]], split: int = 3) -> None:
    """Train ``batches[:split]``, copy the method's and optimizer's state into a method built with another
    seed (nothing may come from its own initialisation), then both must train ``batches[split:]`` to the
    same losses and the same state, bit for bit."""
    method = build(0)
    optimizer = harness_sgd(method)
    train_steps(method, optimizer, batches[:split])
    resumed = build(99)
    resumed.load_state_dict(method.state_dict())
    resumed_optimizer = harness_sgd(resumed)
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else buffers are shared
    assert train_steps(method, optimizer, batches[split:]) == train_steps(resumed, resumed_optimizer, batches[split:])
    for name, value in method.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
