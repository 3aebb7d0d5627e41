"""Every training set by name: imports the modules that register into :data:`bench.data.datasets.DATASETS`.

Import :data:`DATASETS` and :func:`build_trainset` from here (not from :mod:`bench.data.datasets`) when the
registry must be complete: the builders register as a side effect of importing their modules (ours: one
place that imports them once, so the registry module imports none of them).
"""

from __future__ import annotations

from bench.config import DataSettings
from bench.data import synth_trainset as _synth_trainset  # noqa: F401  (registers ``synthface``, listed first)
from bench.data import real as _real  # noqa: F401  (registers the dataset cards and ``custom``)
from bench.data.datasets import DATASETS, TrainData

__all__ = ["DATASETS", "build_trainset"]


def build_trainset(settings: DataSettings, progress: bool = True) -> TrainData:
    """The training set ``settings.dataset`` names (an unknown name is a one-line ConfigError listing the valid ones)."""
    return DATASETS.get(settings.dataset)(settings, progress)
