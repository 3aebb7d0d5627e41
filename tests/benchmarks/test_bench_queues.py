"""pytest-benchmark: the per-step state updates of the queue methods, at the authors' sizes, on CPU.

- DCQ's enqueue: 512 class weights of dimension 512 into a queue of 8,192 (bilylee/DCQ MS1MV2 scripts);
- Prototype Memory's write: 256 prototypes (half refreshed, half new) into a full memory of 16,384;
- a momentum (EMA) update of the ``small`` backbone (DCQ's weight generator, SST's gallery), and of
  ``r50`` (the authors' backbone size), the other per-step cost these methods add.

Nothing is asserted about the time, which depends on the machine. Each test counts the updates the
benchmark made (the number of rounds depends on ``--benchmark-enable``, see conftest.py) and checks the
state they leave against a reference computed another way: the queue's rows, labels and pointer against
a replay written slot by slot, the memory's classes against the closed form of its ageing rule, the
momentum copy against the closed form of repeated EMA. Compare runs with
``pytest tests/benchmarks/test_bench_queues.py --benchmark-compare``.
"""

from __future__ import annotations

import torch

from bench.backbones import build_backbone
from methods.momentum import MomentumEncoder
from methods.queues import NO_LABEL, ClassMemory, FeatureQueue

DIM = 512
CAPACITY, ROWS_PER_WRITE = 8192, 512
#: Rows written before the benchmark, so that writes straddle the end of the buffer (the two-slice path).
OFFSET = 100
#: Distinct (keys, labels) batches the benchmark cycles through, so rows of different writes differ.
BATCHES = 3


def _replayed_queue(initial: torch.Tensor, writes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """The reference: every write's rows put one by one at slot ``(written so far) % capacity``."""
    features, labels, written = initial.clone(), torch.full((CAPACITY,), NO_LABEL, dtype=torch.long), 0
    for keys, key_labels in writes:
        for row in range(keys.shape[0]):
            features[written % CAPACITY], labels[written % CAPACITY] = keys[row], key_labels[row]
            written += 1
    return features, labels, written % CAPACITY


def test_feature_queue_enqueue(benchmark, bench_rounds) -> None:
    """DCQ-sized enqueue. Catches rows or labels written to the wrong slots (e.g. a wrap that drops or
    misplaces the rows past the end), a pointer that does not advance modulo the capacity, and a no-op."""
    generator = torch.Generator().manual_seed(0)
    initial = torch.nn.functional.normalize(torch.randn(CAPACITY, DIM, generator=generator), dim=1)
    queue = FeatureQueue(DIM)
    queue.allocate(CAPACITY, initial)
    first = (torch.randn(OFFSET, DIM, generator=generator), torch.arange(OFFSET) + 10**6)
    queue.enqueue(*first)
    batches = [(torch.nn.functional.normalize(torch.randn(ROWS_PER_WRITE, DIM, generator=generator), dim=1),
                torch.arange(ROWS_PER_WRITE) + k * ROWS_PER_WRITE) for k in range(BATCHES)]
    writes = [first]

    def enqueue() -> None:
        keys, labels = batches[(len(writes) - 1) % BATCHES]
        queue.enqueue(keys, labels)
        writes.append((keys, labels))

    benchmark.extra_info.update(capacity=CAPACITY, rows_per_write=ROWS_PER_WRITE, dim=DIM)
    benchmark.pedantic(enqueue, iterations=1, **bench_rounds(50, 5))
    features, labels, pointer = _replayed_queue(initial, writes)
    assert len(writes) >= 2 and int(queue.ptr) == pointer and bool(queue.full)
    assert torch.equal(queue.labels, labels)
    assert torch.equal(queue.features, features)


def test_class_memory_write(benchmark, bench_rounds) -> None:
    """Prototype Memory's write into a full memory. Each write refreshes the 128 newest classes and adds 128
    new ones, so the memory must hold exactly the 16,384 most recent classes, each once, the newest with
    the prototype written last. Catches a refresh that duplicates a class, an eviction of the wrong
    (not the oldest) slots, and a write that stores nothing."""
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
    benchmark.pedantic(write, iterations=1, **bench_rounds(30, 3))
    assert state["next"] > 16384  # at least one write
    assert sorted(memory.labels.tolist()) == list(range(state["next"] - 16384, state["next"]))
    newest = memory.slots_of(torch.tensor([state["next"] - 1]))
    assert torch.equal(memory.prototypes[newest[0]], prototypes[-1])


def _momentum_update(benchmark, bench_rounds, name: str, input_size: int) -> None:
    """A momentum copy updated n times towards a fixed source: every parameter must equal the closed form
    ``m^n * start + (1 - m^n) * source`` (m = 0.999). Catches a wrong momentum (e.g. 1 - m), a missed
    parameter, and a no-op update (the old check, copy != source, held without any update)."""
    momentum = 0.999
    torch.manual_seed(0)
    backbone = build_backbone(name, embedding_size=128 if name == "small" else 512, input_size=input_size)
    encoder = MomentumEncoder(backbone, momentum)
    start = [p.detach().clone() for p in encoder.parameters()]
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    calls = []

    def update() -> None:
        encoder.update(backbone)
        calls.append(1)

    benchmark.extra_info.update(backbone=name, parameters=sum(p.numel() for p in backbone.parameters()))
    benchmark.pedantic(update, iterations=1, **bench_rounds(10, 2))
    kept = momentum ** len(calls)
    for before, after, source in zip(start, encoder.parameters(), backbone.parameters()):
        torch.testing.assert_close(after, kept * before + (1 - kept) * source, rtol=1e-5, atol=1e-5)
    assert calls


def test_momentum_update_small(benchmark, bench_rounds) -> None:
    _momentum_update(benchmark, bench_rounds, "small", 32)


def test_momentum_update_r50(benchmark, bench_rounds) -> None:
    _momentum_update(benchmark, bench_rounds, "r50", 112)
