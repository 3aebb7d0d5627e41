"""Evaluation protocols by name (``--eval``), metrics and feature extraction.

A protocol is built once per ``bench run`` (it prepares or loads its data) and then evaluates any
encoder: ``PROTOCOLS.get(name)(data_settings, progress).evaluate(encoder, device, batch_size) -> dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol as _Protocol

import torch
from torch import nn

from bench.config import DataSettings
from methods.registry import Registry


class EvalProtocol(_Protocol):
    name: ClassVar[str]
    #: The metric shown in summary tables, and whether higher is better.
    headline: ClassVar[str]

    def __init__(self, data: DataSettings, progress: bool = True) -> None: ...

    def evaluate(self, encoder: nn.Module, device: torch.device, batch_size: int) -> dict[str, Any]: ...


PROTOCOLS: Registry[type[EvalProtocol]] = Registry("protocol")

from bench.eval import verification  # noqa: E402,F401  (registers synth-lfw)
