"""Harness overhead: `bench`'s training loop against a bare loop doing the same work.

Both loops train the same backbone and ArcFace head on the same in-memory batches (same sampler, same
flips, same SGD + schedule + clipping), so they must end with identical parameters; the benchmark
reports the harness's time per step and its ratio to the bare loop (target: within 15%).

Run alone: ``python -m pytest tests/benchmarks/test_bench_harness.py --benchmark-enable -s``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.backbones import build_backbone
from bench.config import TrainSettings
from bench.data.datasets import TrainSet
from bench.data.loader import BatchLoader, flip_images, flip_mask, normalise
from bench.data.sampler import RandomBatchSampler
from bench.train import Trainer, lr_factor
from methods.base import MethodContext, build_method

STEPS, BATCH, IMAGE, CLASSES, EMBEDDING = 12, 128, 32, 1000, 128


def _trainset() -> TrainSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4096, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, CLASSES, (4096,), generator=generator)
    return TrainSet(images=images, labels=labels, identities=labels.numpy(), num_classes=CLASSES)


def _method():
    torch.manual_seed(0)
    backbone = build_backbone("small", embedding_size=EMBEDDING, input_size=IMAGE)
    return build_method("arcface", backbone, MethodContext(CLASSES, EMBEDDING, global_batch_size=BATCH))


def _harness_run(trainset: TrainSet, settings: TrainSettings) -> torch.nn.Module:
    method = _method()
    trainer = Trainer(method, settings, torch.device("cpu"), total_steps=STEPS)
    batches = BatchLoader(trainset, RandomBatchSampler(len(trainset), BATCH, seed=0), torch.device("cpu"), seed=0)
    trainer.fit(batches)
    return method


def _bare_run(trainset: TrainSet, settings: TrainSettings) -> torch.nn.Module:
    """The same computation written as a plain loop, without the Trainer, meters or logging."""
    method = _method()
    method.train()
    optimizer = torch.optim.SGD(method.param_groups(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_fraction * STEPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, STEPS, settings.lr_power))
    sampler = RandomBatchSampler(len(trainset), BATCH, seed=0)
    for step in range(STEPS):
        index = torch.as_tensor(sampler.batch(step))
        images = normalise(flip_images(trainset.images[index], flip_mask(0, step, BATCH)))
        loss = method.head(method.backbone(images), trainset.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.backbone.parameters(), settings.grad_clip_norm)
        optimizer.step()
        schedule.step()
    return method


def test_harness_overhead_against_bare_loop(benchmark):
    trainset = _trainset()
    settings = TrainSettings(batch_size=BATCH, budget=STEPS * BATCH, embedding_size=EMBEDDING, log_every=5)
    bare_times, harness_times = [], []
    for _ in range(3):  # interleaved, so a noisy neighbour hurts both loops alike
        start = time.perf_counter()
        bare = _bare_run(trainset, settings)
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        harness = _harness_run(trainset, settings)
        harness_times.append(time.perf_counter() - start)
    # Same work: identical parameters after identical steps.
    for (name, p_bare), p_harness in zip(bare.state_dict().items(), harness.state_dict().values()):
        assert torch.equal(p_bare, p_harness), name
    ratio = float(np.median(harness_times) / np.median(bare_times))
    benchmark.extra_info.update(bare_s_per_step=float(np.median(bare_times)) / STEPS,
                                harness_s_per_step=float(np.median(harness_times)) / STEPS,
                                harness_over_bare=ratio)
    print(f"\nharness/bare time ratio over {STEPS} steps: {ratio:.3f}")
    benchmark.pedantic(_harness_run, args=(trainset, settings), rounds=1, iterations=1)
