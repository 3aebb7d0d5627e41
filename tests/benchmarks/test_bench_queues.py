"""pytest-benchmark: the per-step state updates of the queue methods, at the authors' sizes, on CPU.

- DCQ's enqueue: 512 class weights of dimension 512 into a queue of 8,192 (bilylee/DCQ MS1MV2 scripts);
- Prototype Memory's write: 256 prototypes (half refreshed, half new) into a full memory of 16,384;
- a momentum (EMA) update of the ``small`` backbone (DCQ's weight generator, SST's gallery), and of
  ``r50`` (the authors' backbone size), the other per-step cost these methods add.

Nothing is asserted about the time, which depends on the machine; the tests check the updates did
happen. Compare runs with ``pytest tests/benchmarks/test_bench_queues.py --benchmark-compare``.
"""

from __future__ import annotations

import torch

from bench.backbones import build_backbone
from methods.momentum import MomentumEncoder
from methods.queues import ClassMemory, FeatureQueue

DIM = 512


def test_feature_queue_enqueue(benchmark) -> None:
    generator = torch.Generator().manual_seed(0)
    queue = FeatureQueue(DIM)
    queue.allocate(8192, torch.nn.functional.normalize(torch.randn(8192, DIM, generator=generator), dim=1))
    keys = torch.nn.functional.normalize(torch.randn(512, DIM, generator=generator), dim=1)
    labels = torch.arange(512)

    benchmark.extra_info.update(capacity=8192, rows_per_write=512, dim=DIM)
    benchmark.pedantic(queue.enqueue, args=(keys, labels), rounds=50, iterations=1, warmup_rounds=5)
    assert torch.equal(queue.labels[queue.positions(512) - 512], labels) or bool(queue.full)


def test_class_memory_write(benchmark) -> None:
    generator = torch.Generator().manual_seed(0)
    memory = ClassMemory(DIM, 16384)
    for start in range(0, 16384, 512):  # fill it: classes 0 .. 16383
        memory.write(torch.randn(512, DIM, generator=generator), torch.arange(start, start + 512))
    prototypes = torch.randn(256, DIM, generator=generator)
    state = {"next": 16384}

    def write() -> None:
        # 128 classes already in memory (refresh) and 128 new ones (evicting the oldest).
        refreshed = torch.arange(state["next"] - 128, state["next"])
        new = torch.arange(state["next"], state["next"] + 128)
        state["next"] += 128
        memory.write(prototypes, torch.cat([refreshed, new]))

    benchmark.extra_info.update(capacity=16384, classes_per_write=256, dim=DIM)
    benchmark.pedantic(write, rounds=30, iterations=1, warmup_rounds=3)
    assert int(memory.occupied().sum()) == 16384 and (memory.labels == state["next"] - 1).sum() == 1


def _momentum_update(benchmark, name: str, input_size: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, embedding_size=128 if name == "small" else 512, input_size=input_size)
    encoder = MomentumEncoder(backbone, 0.999)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    benchmark.extra_info.update(backbone=name, parameters=sum(p.numel() for p in backbone.parameters()))
    benchmark.pedantic(encoder.update, args=(backbone,), rounds=10, iterations=1, warmup_rounds=2)
    assert not torch.equal(next(encoder.parameters()), next(backbone.parameters()))


def test_momentum_update_small(benchmark) -> None:
    _momentum_update(benchmark, "small", 32)


def test_momentum_update_r50(benchmark) -> None:
    _momentum_update(benchmark, "r50", 112)
