"""The training-set registry and the :class:`TrainData` interface the training loop reads from.

This module holds only the registry (:data:`DATASETS`, name -> builder) and the types; the builders
register themselves from their own modules (SynthFace in :mod:`bench.data.synth_trainset`, the card-backed
real sets in :mod:`bench.data.real`), and :mod:`bench.data.catalog` imports them all once (ours: the
registry used to import :mod:`bench.data.real`, which imports the registry, an import circle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from bench.config import DataSettings
from methods.registry import Registry


class TrainData(Protocol):
    """What the training loop needs from a training set (in memory or decoded on demand).

    ``labels`` are the trained class ids ``0..num_classes-1`` of the split's images; ``load`` returns uint8
    images ``[B, 3, S, S]`` (RGB, ``S = image_size``) and their labels. A set with ``decodes_on_demand``
    is loaded in DataLoader workers (:class:`bench.data.loader.BatchLoader`) and its ``load`` also takes
    ``flip=mask`` (mirror those images while decoding); ``info`` goes to ``data.json``. A set that knows
    which of its labels it corrupted on purpose exposes ``label_flipped`` (bool ``[N]``; SynthFace's label
    noise), read with ``getattr`` by the diagnostics that score against it.
    """

    decodes_on_demand: ClassVar[bool]
    labels: torch.Tensor
    num_classes: int
    info: dict[str, Any]

    def __len__(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    def load(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainSet:
    """Decoded training images with their class labels, in memory (SynthFace).

    ``labels`` are the trained class ids ``0..num_classes-1`` (after any label noise); ``identities``
    are the pool identity of each image and ``label_flipped`` marks the images whose label the label noise
    changed (the truth, for diagnostics such as :func:`bench.curation.curation_report`; None: the set does
    not know, as for real data).
    """

    images: torch.Tensor
    labels: torch.Tensor
    identities: np.ndarray
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    label_flipped: np.ndarray | None = None
    decodes_on_demand: ClassVar[bool] = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def load(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[B, 3, S, S]`` and labels ``[B]`` of the given indices."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images.index_select(0, index), self.labels.index_select(0, index)


DatasetBuilder = Callable[[DataSettings, bool], TrainData]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")
