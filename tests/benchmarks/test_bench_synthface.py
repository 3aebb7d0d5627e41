"""Throughput of the SynthFace renderer at the training resolution (32 px), JPEG included.

The target is about 3,000 images/s on the 2-core benchmark CPU (tests run with 2 threads, see
``tests/conftest.py``), so that rendering a 40k-image training pool takes seconds. The images/s figure
is stored in the benchmark's ``extra_info``.
"""

from __future__ import annotations

import torch

from bench.data.synthface import SynthFace, SynthFaceConfig

IMAGES = 1024
IMAGE_SIZE = 32


def test_render_throughput(benchmark) -> None:
    synth = SynthFace(SynthFaceConfig(seed=0, image_size=IMAGE_SIZE, nuisance=1.0, twin_fraction=0.1))
    identities = torch.arange(IMAGES) // 8
    samples = torch.arange(IMAGES) % 8
    rendered = benchmark.pedantic(synth.render, args=(identities, samples), rounds=5, warmup_rounds=1, iterations=1)
    assert rendered.images.shape == (IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_second"] = round(IMAGES / benchmark.stats.stats.min)
