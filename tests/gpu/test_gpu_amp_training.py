"""Every registered method trains with AMP on the GPU preset's backbone and input size (issue 19).

Each method of :data:`methods.base.METHODS` trains ``train_steps`` (50) steps of the GPU preset
(``results/baselines/gpu.yaml``: r50, 112 x 112, embedding 512, ``train.amp: true``) through the harness's
:class:`bench.train.Trainer`, i.e. float16 autocast and a GradScaler on CUDA, SGD, warm-up and decay, the
method's own batches (:func:`bench.runner.make_sampler`), on a small SynthFace pool it can memorise.

What it catches on CUDA: a method whose AMP path makes a NaN or infinite loss (an fp16 overflow in a
margin, a queue or a momentum encoder); a GradScaler that skips most steps (gradients always inf or NaN,
so nothing trains); AMP silently off although the preset asks for it; a method that does not learn under
autocast (the mean of the last ``loss_window`` losses not below the mean of the first: lost gradients,
a detached head, a wrong cast); "below" means by at least ``min_loss_fall`` (20 %), since with learning
off the two means differ by up to 13 % (see :class:`tests.gpu.gpu_settings.GpuSizes`). The losses,
skipped steps, step time and peak memory are recorded.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Iterator

import pytest
import torch

from bench.backbones import build_backbone
from bench.data.loader import normalise
from bench.data.synth_trainset import TRAIN_NAMESPACE
from bench.profiling import PeakMemory
from bench.runner import make_sampler
from bench.train import Trainer, seed_everything
from methods.base import METHODS, Method, MethodContext, build_method
from tests.gpu.gpu_settings import GpuSizes, gpu_preset, render_faces, synchronize


@dataclasses.dataclass
class FacePool:
    """A rendered training pool, shaped as the samplers expect (``len`` and ``labels``)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@pytest.fixture(scope="module")
def pool(sizes: GpuSizes) -> FacePool:
    images, labels = render_faces(sizes.train_identities, sizes.train_images_per_identity, sizes.image_size,
                                  TRAIN_NAMESPACE)
    return FacePool(images, labels)


def _batches(pool: FacePool, method: Method, batch_size: int, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The method's batches from the harness's sampler, normalised on the device as the loader does."""
    for indices in make_sampler(method, pool, batch_size, seed=0):
        index = torch.from_numpy(indices)
        yield normalise(pool.images[index].to(device)), pool.labels[index].to(device)


def _train(trainer: Trainer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
           device: torch.device) -> tuple[list[float], list[float]]:
    """The loss and the wall time (s) of each of ``steps`` training steps."""
    losses, times = [], []
    for _ in range(steps):
        images, labels = next(batches)
        start = time.perf_counter()
        losses.append(float(trainer.step(images, labels)))  # float() waits for the step
        synchronize(device)
        times.append(time.perf_counter() - start)
    return losses, times


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_with_amp(name: str, device: torch.device, sizes: GpuSizes, pool: FacePool, record) -> None:
    preset = gpu_preset()
    settings = dataclasses.replace(preset.train, batch_size=sizes.train_batch, embedding_size=sizes.embedding_size,
                                   backbone=sizes.backbone, device=str(device), ckpt_every=0)
    seed_everything(settings.seed)
    backbone = build_backbone(settings.backbone, embedding_size=settings.embedding_size, input_size=sizes.image_size)
    ctx = MethodContext(sizes.train_identities, settings.embedding_size, settings.batch_size, sizes.train_steps)
    method = build_method(name, backbone, ctx, preset.method_params.get(name)).to(device)
    trainer = Trainer(method, settings, device, total_steps=sizes.train_steps)
    memory = PeakMemory(device)
    losses, times = _train(trainer, _batches(pool, method, settings.batch_size, device),
                           sizes.train_steps, device)
    window = sizes.loss_window
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    record(f"amp_training/{name}", {
        "backbone": settings.backbone, "image_size": sizes.image_size, "batch_size": settings.batch_size,
        "amp": trainer.amp, "steps": sizes.train_steps, "amp_skipped_steps": trainer.amp_skipped_steps,
        "loss_first_mean": first, "loss_last_mean": last, "loss_last_over_first": last / first,
        "losses": [round(x, 4) for x in losses], "median_step_s": statistics.median(times),
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_method": memory.describe()})

    assert all(math.isfinite(x) for x in losses), f"{name}: non-finite loss at step {_first_bad(losses)}"
    trainer.check_finite()
    assert trainer.amp == (device.type == "cuda" and preset.train.amp), "AMP on CUDA must follow train.amp"
    assert trainer.amp_skipped_steps < sizes.train_steps // 2, \
        f"{name}: the GradScaler skipped {trainer.amp_skipped_steps} of {sizes.train_steps} steps"
    assert last < (1 - sizes.min_loss_fall) * first, \
        f"{name}: loss fell by less than {sizes.min_loss_fall:.0%} ({first:.4f} over the first {window} steps, " \
        f"{last:.4f} over the last)"


def _first_bad(losses: list[float]) -> int:
    return next(step for step, loss in enumerate(losses, 1) if not math.isfinite(loss))
