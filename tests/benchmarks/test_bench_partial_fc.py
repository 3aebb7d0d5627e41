"""Partial FC at scale: memory and speed of one training step at C = 1,000,000 classes, D = 512,
batch 128, r = 0.1, default (sparse) update, float32 on CPU.

Reported in ``benchmark.extra_info`` (and printed with ``-s``):

- ``extra_peak_over_budget``: the step's peak resident memory beyond the stored weights and optimizer
  state (the process RSS before the step), divided by (sampled logits + sampled weights + their
  gradient). Target: under 1.5, i.e. nothing of size C x D is allocated per step.
- ``pfc_fwd_bwd_over_matmuls``: forward + backward time over the time of the three matrix products a
  sampled softmax cannot avoid (logits, gradient w.r.t. embeddings, gradient w.r.t. sampled centers).
  Target: at most 2.
- ``autograd_fwd_bwd_over_matmuls``: the same for a plain-autograd implementation of the same loss
  (normalise the gathered centers, linear, margin, cross-entropy: the structure of insightface's
  PartialFC_V2), for comparison.
- ``full_fc_step_over_pfc_step``: a full-FC ArcFace step of the same size over the Partial FC step.

``FACEBENCH_PFC_BENCH_CLASSES`` overrides C (e.g. 100000 for a quick look). Run:
``python -m pytest tests/benchmarks/test_bench_partial_fc.py -s``.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from bench.profiling import PeakMemory, resident_bytes
from methods.arcface import ArcFace
from methods.margins import apply_rule
from methods.partial_fc import PartialFC

NUM_CLASSES = int(os.environ.get("FACEBENCH_PFC_BENCH_CLASSES", "1000000"))
EMBEDDING, BATCH, RATE = 512, 128, 0.1
CPU = torch.device("cpu")


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def pfc():
    torch.manual_seed(0)
    head = PartialFC(EMBEDDING, NUM_CLASSES, sample_rate=RATE)
    optimizer = _sgd(head.parameters())
    head.attach_optimizer(optimizer)
    return head, optimizer


def test_partial_fc_memory_and_speed(benchmark, pfc):
    head, optimizer = pfc
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(BATCH, EMBEDDING, generator=generator, requires_grad=True)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None
        head(embeddings, labels).backward()
        optimizer.step()
        head.step_end()

    step()  # warm-up: optimizer state exists from now on
    sampled = math.ceil(RATE * NUM_CLASSES)
    budget = 4 * (BATCH * sampled + 2 * sampled * EMBEDDING)  # logits + sampled weights + their gradient
    baseline = resident_bytes()
    meter = PeakMemory(CPU)
    step()
    extra = meter.peak_bytes() - baseline
    assert meter.rss_reset, "peak RSS reset (/proc/self/clear_refs) is needed to measure one step"

    def forward_backward():
        embeddings.grad = None
        head(embeddings, labels).backward()
        head.active_weight.grad = None

    fwd_bwd = _median_time(forward_backward)
    centers = torch.randn(sampled, EMBEDDING)
    grad_logits = torch.randn(BATCH, sampled)
    x = embeddings.detach()
    matmuls = _median_time(lambda: (x @ centers.t(), grad_logits @ centers, grad_logits.t() @ x))

    def autograd_forward_backward():
        index = torch.randperm(NUM_CLASSES)[:sampled].sort().values
        weight = head.weight.index_select(0, index).requires_grad_(True)
        cos = torch.nn.functional.linear(torch.nn.functional.normalize(embeddings),
                                         torch.nn.functional.normalize(weight)).clamp(-1, 1)
        local = torch.randint(0, sampled, (BATCH,))
        torch.nn.functional.cross_entropy(apply_rule(cos, local, head.rule), local).backward()
        embeddings.grad = None

    autograd_time = _median_time(autograd_forward_backward)
    pfc_step = _median_time(step)
    head.step_end()

    del centers, grad_logits
    full = ArcFace(EMBEDDING, NUM_CLASSES)
    full_optimizer = _sgd(full.parameters())

    def full_step():
        full_optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None
        full(embeddings, labels).backward()
        full_optimizer.step()

    full_step()
    full_time = _median_time(full_step, repeats=2)
    del full, full_optimizer

    info = {
        "classes": NUM_CLASSES, "sampled_centers": sampled,
        "extra_peak_bytes": extra, "budget_bytes": budget, "extra_peak_over_budget": extra / budget,
        "pfc_fwd_bwd_s": fwd_bwd, "three_matmuls_s": matmuls, "pfc_fwd_bwd_over_matmuls": fwd_bwd / matmuls,
        "autograd_fwd_bwd_s": autograd_time, "autograd_fwd_bwd_over_matmuls": autograd_time / matmuls,
        "pfc_step_s": pfc_step, "full_fc_step_s": full_time, "full_fc_step_over_pfc_step": full_time / pfc_step,
    }
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items()))
    # Memory is not a timing: it is asserted. Nothing of size C x D was allocated during the step.
    assert extra / budget < 1.5, info
    assert head.active_weight.numel() == 0
    benchmark.pedantic(step, rounds=1, iterations=1)
