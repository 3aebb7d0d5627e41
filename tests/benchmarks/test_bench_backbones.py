"""pytest-benchmark: one training step (forward + backward) of ``small`` on CPU.

Batch 128 at 32x32, embedding 128, two threads: the setting ``small`` was sized for (its module
docstring gives the target, 40-80 ms, and the times measured when it was designed). Nothing is
asserted about the time, which depends on the machine; compare runs with
``pytest tests/benchmarks --benchmark-compare``. The gradients of the last timed step are checked, so a
step that computes wrong, stale, accumulated or partial gradients fails: every parameter's against the
same loss differentiated in float64, and the head's (the layers after the last PReLU, where the loss is
smooth) against central finite differences, a path that shares no backward code. Finite differences
through the trunk are not used: its PReLU kinks make them depend on the step size by about 1 %.
"""

from __future__ import annotations

import copy
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


def _loss(model: torch.nn.Module, images: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    return (model(images) * projection).sum()


#: The head of ``small`` (bn2 -> flatten -> dropout -> fc -> features BatchNorm1d): no kink after it.
HEAD_PREFIXES = ("bn2.", "fc.", "features.")


def _directional_derivative(model: torch.nn.Module, images: torch.Tensor, projection: torch.Tensor,
                            directions: list[torch.Tensor], step: float = 1e-6) -> float:
    """d loss / d eps of the loss at parameters + eps * directions, by central differences (float64)."""
    params = [p for p in model.parameters() if p.requires_grad]
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, d in zip(params, directions):
                p.add_(sign * step * d)
            values.append(float(_loss(model, images, projection)))
            for p, d in zip(params, directions):
                p.sub_(sign * step * d)
    return (values[0] - values[1]) / (2 * step)


def test_small_forward_backward(benchmark, bench_rounds, two_threads: None) -> None:
    """Timed step of ``small``. Catches gradients that are missing, wrong, or accumulated over the rounds
    (a zero_grad that does not reset them): each equals the float64 gradient of the same loss, and the
    head's, projected on random directions, equal float64 finite differences (rel 1e-4)."""
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
    benchmark.pedantic(step, iterations=1, **bench_rounds(10, 3))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in named)
    # The reference: the same model in float64 (train mode, as timed: BatchNorm uses the batch statistics).
    reference = copy.deepcopy(model).double()
    reference.zero_grad(set_to_none=True)
    _loss(reference, images.double(), projection.double()).backward()
    expected = [q.grad for q in reference.parameters() if q.requires_grad]
    # Absolute tolerance on the scale of the largest gradient: biases feeding a BatchNorm have a zero gradient,
    # which float32 gives as rounding noise (about 1e-5 here).
    scale = max(float(g.abs().max()) for g in expected)
    for (name, p), q in zip(named, expected):
        error = float((p.grad.double() - q).abs().max())
        assert error <= 1e-3 * float(q.abs().max()) + 1e-5 * scale, (name, error)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        directions = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * name.startswith(HEAD_PREFIXES)
                      for name, p in named]
        analytic = sum(float((p.grad.double() * d).sum()) for (_, p), d in zip(named, directions))
        numeric = _directional_derivative(reference, images.double(), projection.double(), directions)
        assert analytic == pytest.approx(numeric, rel=1e-4)
