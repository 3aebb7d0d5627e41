"""Partial FC at C = 1M classes on CUDA: step time and peak memory of one training step (issue 19).

The case of the CPU benchmark ``tests/benchmarks/test_bench_partial_fc.py`` (its D = 512, batch 128,
r = 0.1 and SGD, imported from it; sparse update with the optimizer attached as the harness does) at
``pfc_classes`` (1M) classes on the device. Memory is ``torch.cuda.max_memory_allocated`` during one step
minus what was allocated before it (the centers, their momentum rows and whatever the warm-up step left,
such as cuBLAS's workspace and Partial FC's reused buffer of sampled rows, one ``[K, D]``; the CPU
benchmark counts that buffer as extra, since it measures from before the first step), over the sampled working set of :mod:`tests.partial_fc_scale` (the CPU
benchmark's definition). Asserted under 1.5, as on the CPU: a property, not a time. Step time (median
of 5 synchronised steps) is recorded, never asserted.

What it catches: a CUDA path of Partial FC that allocates something of size C x D per step (a dense
gradient or momentum of all centers, a gather of every center, a ``[B, C]`` logit matrix), or that does
not write the sampled rows back (``active_weight`` left full).
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.profiling import PeakMemory, resident_bytes
from methods.partial_fc import PartialFC
from tests.benchmarks.test_bench_partial_fc import BATCH, EMBEDDING, RATE, _sgd
from tests.gpu.gpu_settings import GpuSizes, synchronize
from tests.partial_fc_scale import MAX_EXTRA_OVER_WORKING_SET, sampled_centers, sampled_working_set_bytes

TIMED_STEPS = 5


def _held_bytes(device: torch.device) -> int:
    """Memory held before the step: CUDA's allocated bytes, or the process RSS on the CPU."""
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else resident_bytes()


def test_partial_fc_at_scale_memory_and_step_time(device: torch.device, sizes: GpuSizes, record) -> None:
    num_classes = sizes.pfc_classes
    torch.manual_seed(0)
    head = PartialFC(EMBEDDING, num_classes, sample_rate=RATE).to(device)
    optimizer = _sgd(head.parameters())
    head.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, EMBEDDING, generator=generator).to(device).requires_grad_(True)
    labels = torch.randint(0, num_classes, (BATCH,), generator=generator).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None
        head(embeddings, labels).backward()
        optimizer.step()
        synchronize(device)

    step()  # warm-up: the optimizer's row state and the libraries' workspaces exist from now on
    held = _held_bytes(device)
    meter = PeakMemory(device)
    step()
    extra = meter.peak_bytes() - held
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sampled = sampled_centers(num_classes, RATE)
    working_set = sampled_working_set_bytes(BATCH, sampled, EMBEDDING)
    record("partial_fc_at_scale", {
        "classes": num_classes, "embedding_size": EMBEDDING, "batch_size": BATCH, "sample_rate": RATE,
        "sampled_centers": sampled, "held_before_step_bytes": held, "step_peak_beyond_held_bytes": extra,
        "working_set_bytes": working_set, "extra_over_working_set": extra / working_set,
        "median_step_s": statistics.median(times), "memory_method": meter.describe()})

    if device.type == "cpu":
        assert meter.rss_reset, "peak RSS reset (/proc/self/clear_refs) is needed to measure one step"
    assert extra / working_set < MAX_EXTRA_OVER_WORKING_SET, \
        f"one step allocated {extra / working_set:.2f} x the sampled working set beyond weights and optimizer state"
    assert head.active_weight.numel() == 0, "the sampled centers were not written back after the step"
