"""pytest-benchmark: one training step (forward + backward) of ``small`` on CPU.

Batch 128 at 32x32, embedding 128, two threads: the setting ``small`` was sized for (its module
docstring gives the target, 40-80 ms, and the times measured when it was designed). Nothing is
asserted about the time, which depends on the machine; compare runs with
``pytest tests/benchmarks --benchmark-compare``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bench.backbones import build_backbone

BATCH_SIZE = 128
INPUT_SIZE = 32
EMBEDDING_SIZE = 128
NUM_THREADS = 2


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    yield
    torch.set_num_threads(previous)


def test_small_forward_backward(benchmark, two_threads: None) -> None:
    torch.manual_seed(0)
    model = build_backbone("small", embedding_size=EMBEDDING_SIZE, input_size=INPUT_SIZE).train()
    images = torch.rand(BATCH_SIZE, 3, INPUT_SIZE, INPUT_SIZE) * 2 - 1
    # A random projection of the output, so gradients reach the trunk (a plain sum after the
    # train-mode BatchNorm1d would not depend on the input).
    projection = torch.randn(BATCH_SIZE, EMBEDDING_SIZE)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (model(images) * projection).sum().backward()

    benchmark.extra_info.update(
        backbone="small", batch_size=BATCH_SIZE, input_size=INPUT_SIZE, embedding_size=EMBEDDING_SIZE,
        threads=NUM_THREADS, parameters=sum(p.numel() for p in model.parameters()),
    )
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=3)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
