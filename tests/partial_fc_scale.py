"""The Partial FC at-scale memory measure, shared by the CPU benchmark and the GPU check.

``tests/benchmarks/test_bench_partial_fc.py`` (CPU, process RSS) and ``tests/gpu/test_gpu_partial_fc.py``
(CUDA, ``torch.cuda.max_memory_allocated``) both divide the peak memory of one training step beyond the
stored weights and optimizer state by the *sampled working set*: the ``[B, K]`` float32 logits plus the
``[K, D]`` sampled centers and their gradient, ``K = ceil(r * C)`` sampled centers. Under 1.5 means
nothing of size ``C x D`` is allocated per step (the CPU benchmark's target, README "Measured performance
of the hot paths"). The formula is the CPU benchmark's ``budget``, written once here.
"""

from __future__ import annotations

import math

FLOAT32_BYTES = 4
#: Largest allowed (step peak beyond weights and optimizer state) / (sampled working set).
MAX_EXTRA_OVER_WORKING_SET = 1.5


def sampled_centers(num_classes: int, sample_rate: float) -> int:
    """``K = ceil(r * C)``: centers one Partial FC step computes logits for (on one rank)."""
    return math.ceil(sample_rate * num_classes)


def sampled_working_set_bytes(batch_size: int, sampled: int, embedding_size: int) -> int:
    """Bytes of the sampled logits ``[B, K]`` plus the sampled centers ``[K, D]`` and their gradient."""
    return FLOAT32_BYTES * (batch_size * sampled + 2 * sampled * embedding_size)
