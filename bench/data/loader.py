"""Batch assembly: gather uint8 images, random horizontal flip, move to the device, normalise.

The normalisation is insightface's ``(x / 255 - 0.5) / 0.5`` (arcface_torch dataset.py), i.e. pixels in
[-1, 1]; the only augmentation is a horizontal flip with probability 0.5, as insightface trains. Images
travel to the device as uint8 (4x fewer bytes than float) and are converted there.

Two paths behind one iterator. In-memory sets (SynthFace) are gathered in the training process: a
gather costs under a millisecond, far less than handing batches between processes. Sets that decode on
demand (``trainset.decodes_on_demand``: RecordIO, image folders) are decoded by DataLoader workers, one
whole batch per task, :data:`PREFETCH_BATCHES` batches ahead per worker. On both paths the flips of batch
``b`` are drawn from a generator seeded by ``(seed, b)`` (:func:`flip_mask`), so batches are identical for
any number of workers or ranks, and after a resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from bench.data.datasets import TrainData
from bench.errors import DataError

#: Probability of a horizontal flip (insightface RandomHorizontalFlip default).
FLIP_PROBABILITY = 0.5
#: Batches each decoding worker prepares ahead (DataLoader ``prefetch_factor``; arcface_torch queues 6).
PREFETCH_BATCHES = 4
#: Stream id of the per-batch flip draws of decoded-on-demand sets (see bench.data.sampler's stream ids).
_FLIP_STREAM = 2


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] in [0, 255] -> float32 in [-1, 1] as ``(x / 255 - 0.5) / 0.5``."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def flip_mask(seed: int, batch_number: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Which images of batch ``batch_number`` to flip (probability :data:`FLIP_PROBABILITY`).

    Drawn for the whole global batch (``batch_size`` images per rank) from a generator seeded by
    ``(seed, batch_number)``, then sliced for ``rank``: the same flips whichever process decodes the
    batch, however many ranks share it, and after a resume.
    """
    draws = np.random.default_rng([seed, _FLIP_STREAM, batch_number]).random(batch_size * world_size)
    return draws[rank * batch_size:(rank + 1) * batch_size] < FLIP_PROBABILITY


def flip_images(images: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Mirror the images where ``mask`` is true (uint8 ``[B, 3, H, W]``)."""
    flip = torch.from_numpy(mask).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


class _DecodeBatches(torch.utils.data.Dataset):
    """Map-style over ``(batch_number, indices)``: one item is one whole decoded (and flipped) batch.

    Sets that decode on demand take ``load(indices, flip=mask)`` and mirror while decoding."""

    def __init__(self, trainset: TrainData, seed: int, flip: bool, rank: int, world_size: int) -> None:
        self.trainset, self.seed, self.flip, self.rank, self.world_size = trainset, seed, flip, rank, world_size

    def __getitem__(self, item: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor] | _DataFailure:
        number, indices = item
        mask = flip_mask(self.seed, number, len(indices), self.rank, self.world_size) if self.flip else None
        try:
            return self.trainset.load(indices, flip=mask)  # type: ignore[call-arg]
        except DataError as exc:
            # Returned, not raised: DataLoader would re-raise it with the worker's traceback in the message,
            # and a data error must stay one line.
            return _DataFailure(str(exc))


class _DataFailure:
    def __init__(self, message: str) -> None:
        self.message = message


class _NumberedBatches:
    """The sampler's index batches, numbered from the sampler's position (so a resumed sampler continues)."""

    def __init__(self, sampler: Iterable[np.ndarray]) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        number = int(getattr(self.sampler, "batches_served", 0))
        for indices in self.sampler:
            yield number, indices
            number += 1


class BatchLoader:
    """Turns index batches from a sampler into ``(images, labels)`` on ``device``.

    ``workers`` (sets that decode on demand only; default ``trainset.workers``, else 2) is the number of
    decoding processes; 0 decodes in this process, with the same batches.
    """

    def __init__(self, trainset: TrainData, sampler: Iterable[np.ndarray], device: torch.device, seed: int,
                 flip: bool = True, workers: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.trainset, self.device, self.flip, self.seed = trainset, device, flip, seed
        self.rank, self.world_size = rank, world_size
        self._pin = device.type == "cuda"
        self._decoded: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        if getattr(trainset, "decodes_on_demand", False):
            workers = int(getattr(trainset, "workers", 2)) if workers is None else workers
            loader = torch.utils.data.DataLoader(
                _DecodeBatches(trainset, seed, flip, rank, world_size), batch_size=None,
                sampler=_NumberedBatches(sampler),
                num_workers=workers, prefetch_factor=PREFETCH_BATCHES if workers else None,
                persistent_workers=False, pin_memory=self._pin)
            self._decoded = iter(loader)
            self.numbered: Iterator[tuple[int, np.ndarray]] = iter(())
        else:
            self.numbered = iter(_NumberedBatches(sampler))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._decoded is not None:
            batch = next(self._decoded)  # flipped (and pinned on CUDA) already
            if isinstance(batch, _DataFailure):
                raise DataError(batch.message)
            images, labels = batch
        else:
            number, indices = next(self.numbered)
            images, labels = self.trainset.load(indices)
            if self.flip:
                images = flip_images(images, flip_mask(self.seed, number, len(indices), self.rank, self.world_size))
            if self._pin:
                images, labels = images.pin_memory(), labels.pin_memory()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return normalise(images), labels

    def close(self) -> None:
        """Stop the decoding workers (they also stop when the loader is garbage-collected)."""
        if self._decoded is not None and hasattr(self._decoded, "_shutdown_workers"):
            self._decoded._shutdown_workers()
        self._decoded = None
