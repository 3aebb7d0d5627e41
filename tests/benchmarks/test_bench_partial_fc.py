"""Partial FC at scale: memory and speed of one training step at C = 1,000,000 classes, D = 512,
batch 128, r = 0.1, default (sparse) update, float32 on CPU (issue 14, item 7).

The step is ``bench profile``'s (:class:`bench.profile.CaseRun`): the method built through the registry
as ``bench run`` builds it, on an identity backbone over fixed random embeddings, stepped by
:meth:`bench.train.Trainer.step` (SGD with momentum and weight decay, LR schedule, gradient clip, the
sparse momentum update of the sampled rows, the write-back in ``on_step_end``). Reported in
``benchmark.extra_info`` (and printed with ``-s``):

- ``extra_peak_over_budget``: the peak resident memory of the first two steps beyond the stored weights
  and optimizer state (the process RSS before the first step: what the steps keep between them counts as
  extra), divided by the sampled working set (sampled logits + sampled weights + their gradient,
  :mod:`tests.partial_fc_scale`). Target: under 1.5, i.e. nothing of size C x D
  is allocated per step (asserted: a property, not a time).
- ``pfc_fwd_bwd_over_matmuls``: ``Trainer.forward_backward`` (forward + backward) over the *floor*, the
  time of the three matrix products a sampled softmax cannot avoid (logits, gradient w.r.t. embeddings,
  gradient w.r.t. sampled centers), timed as ``bench profile`` times its floor
  (:func:`bench.profile.floor_ms`). Target: at most 1.5.
- ``pfc_step_over_matmuls``: the whole ``Trainer.step`` over the same floor. Target: at most 2.5.
- ``autograd_fwd_bwd_over_matmuls``: a plain-autograd implementation of the same loss (normalise the
  gathered centers, linear, margin, cross-entropy: the structure of insightface's PartialFC_V2), for
  comparison.
- ``full_fc_step_over_pfc_step``: a full-FC ArcFace ``Trainer.step`` of the same size over the Partial FC
  step (skipped with ``FACEBENCH_PFC_BENCH_FULL_FC=0``).

Times are medians of ``FACEBENCH_PFC_BENCH_REPEATS`` (default 3) runs. ``FACEBENCH_PFC_BENCH_CLASSES``
overrides C (e.g. 100000 for a quick look). Run: ``python -m pytest tests/benchmarks/test_bench_partial_fc.py -s``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from bench.config import TrainSettings
from bench.profile import COSTS, CaseRun, case_shape, floor_ms, parse_case
from bench.profiling import PeakMemory, resident_bytes
from methods.margins import apply_rule
from tests.partial_fc_scale import MAX_EXTRA_OVER_WORKING_SET, sampled_centers, sampled_working_set_bytes

NUM_CLASSES = int(os.environ.get("FACEBENCH_PFC_BENCH_CLASSES", "1000000"))
REPEATS = int(os.environ.get("FACEBENCH_PFC_BENCH_REPEATS", "3"))
WITH_FULL_FC = os.environ.get("FACEBENCH_PFC_BENCH_FULL_FC", "1") != "0"
EMBEDDING, BATCH, RATE = 512, 128, 0.1
CPU = torch.device("cpu")
#: Steps the run is built for (the LR schedule's length); more than the benchmark takes.
TOTAL_STEPS = 1000


def _sgd(params) -> torch.optim.SGD:  # noqa: ANN001
    """The harness's SGD (bench.config.TrainSettings defaults), for callers that build their own head."""
    train = TrainSettings()
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)


def _median_s(fn: Callable[[], None], after: Callable[[], None] = lambda: None, repeats: int = REPEATS) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, ``after`` run untimed after each."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        after()
    return statistics.median(times)


def _case_run(label: str) -> CaseRun:
    case = parse_case(label)
    return CaseRun(case, case_shape(case, NUM_CLASSES, BATCH, EMBEDDING), TOTAL_STEPS, CPU)


@pytest.fixture(scope="module")
def pfc() -> CaseRun:
    return _case_run(f"pfc-{RATE}")


def _autograd_forward_backward(run: CaseRun, sampled: int) -> Callable[[], None]:
    head = run.method.head
    embeddings = run.embeddings

    def forward_backward() -> None:
        index = torch.randperm(NUM_CLASSES)[:sampled].sort().values
        weight = head.weight.index_select(0, index).requires_grad_(True)
        cos = torch.nn.functional.linear(torch.nn.functional.normalize(embeddings),
                                         torch.nn.functional.normalize(weight)).clamp(-1, 1)
        local = torch.randint(0, sampled, (BATCH,))
        torch.nn.functional.cross_entropy(apply_rule(cos, local, head.rule), local).backward()
        embeddings.grad = None

    return forward_backward


def test_partial_fc_memory_and_speed(benchmark, pfc: CaseRun) -> None:  # noqa: ANN001
    """Catches: a Partial FC training step (as the harness runs it) that allocates something of size C x D
    (a dense gradient or momentum of all centers, a gather of every center, a [B, C] logit matrix), or
    that does not write the sampled rows back (``active_weight`` left full after the step)."""
    run, sampled = pfc, sampled_centers(NUM_CLASSES, RATE)
    budget = sampled_working_set_bytes(BATCH, sampled, EMBEDDING)
    # Before the first step the process holds the weights and the optimizer state (every center's momentum
    # row, allocated when the Trainer attaches the optimizer); whatever a step allocates, and keeps for the
    # next one (Partial FC's reusable row workspaces), counts as extra.
    baseline = resident_bytes()
    meter = PeakMemory(CPU)
    run.step()  # warm-up (first touch of the workspaces); optimizer state exists from now on
    run.step()
    extra = meter.peak_bytes() - baseline
    assert meter.rss_reset, "peak RSS reset (/proc/self/clear_refs) is needed to measure one step"

    shape = case_shape(parse_case(f"pfc-{RATE}"), NUM_CLASSES, BATCH, EMBEDDING)
    floor = floor_ms(COSTS["pfc"].gemms(shape, sampled), CPU, repeats=REPEATS) / 1000.0
    fwd_bwd = _median_s(lambda: run.trainer.forward_backward(*run.batch()), after=run.method.on_step_end)
    pfc_step = _median_s(run.step)
    autograd_time = _median_s(_autograd_forward_backward(run, sampled))
    info = {
        "classes": NUM_CLASSES, "sampled_centers": sampled, "repeats": REPEATS,
        "extra_peak_bytes": extra, "budget_bytes": budget, "extra_peak_over_budget": extra / budget,
        "three_matmuls_s": floor, "pfc_fwd_bwd_s": fwd_bwd, "pfc_fwd_bwd_over_matmuls": fwd_bwd / floor,
        "pfc_step_s": pfc_step, "pfc_step_over_matmuls": pfc_step / floor,
        "autograd_fwd_bwd_s": autograd_time, "autograd_fwd_bwd_over_matmuls": autograd_time / floor,
    }
    if WITH_FULL_FC:
        full = _case_run("arcface")
        full.step()
        full_time = _median_s(full.step, repeats=min(REPEATS, 2))
        del full
        info.update({"full_fc_step_s": full_time, "full_fc_step_over_pfc_step": full_time / pfc_step})
    benchmark.extra_info.update(info)
    print("\n" + "\n".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in info.items()))
    # Memory is not a timing: it is asserted. Nothing of size C x D was allocated during the step.
    assert extra / budget < MAX_EXTRA_OVER_WORKING_SET, info
    assert run.method.head.active_weight.numel() == 0
    benchmark.pedantic(run.step, rounds=1, iterations=1)
