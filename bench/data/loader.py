"""Batch assembly: gather uint8 images, random horizontal flip, move to the device, normalise.

The normalisation is insightface's ``(x / 255 - 0.5) / 0.5`` (arcface_torch dataset.py), i.e. pixels in
[-1, 1]; the only augmentation is a horizontal flip with probability 0.5, as insightface trains. Images
travel to the device as uint8 (4x fewer bytes than float) and are converted there.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bench.data.datasets import TrainSet

#: Probability of a horizontal flip (insightface RandomHorizontalFlip default).
FLIP_PROBABILITY = 0.5


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float32 in [-1, 1] as ``(x / 255 - 0.5) / 0.5``."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability :data:`FLIP_PROBABILITY`."""
    flip = torch.rand(images.shape[0], generator=generator) < FLIP_PROBABILITY
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class BatchLoader:
    """Turns index batches from a sampler into ``(images, labels)`` on ``device``."""

    def __init__(self, trainset: TrainSet, sampler: Iterator[np.ndarray], device: torch.device, seed: int,
                 flip: bool = True) -> None:
        self.trainset, self.sampler, self.device, self.flip = trainset, iter(sampler), device, flip
        self.generator = torch.Generator().manual_seed(seed)
        self._pin = device.type == "cuda"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.trainset.load(next(self.sampler))
        if self.flip:
            images = random_flip(images, self.generator)
        if self._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return normalise(images), labels
