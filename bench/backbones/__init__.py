"""Backbone registry: ``build_backbone(name, embedding_size, input_size)`` returns an ``nn.Module``
mapping images ``[B, 3, input_size, input_size]`` (normalised to [-1, 1]) to raw embeddings
``[B, embedding_size]``.

Each module registers its networks with ``@BACKBONES.register("name")`` on a builder
``(embedding_size: int, input_size: int, **kwargs) -> nn.Module``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from methods.registry import ConfigError, Registry

BackboneBuilder = Callable[..., nn.Module]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def build_backbone(name: str, embedding_size: int = 512, input_size: int = 112, **kwargs) -> nn.Module:
    """Build the registered backbone ``name`` for square inputs of side ``input_size``."""
    builder = BACKBONES.get(name)
    options = [p for p in inspect.signature(builder).parameters if p not in ("embedding_size", "input_size")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ConfigError(f"backbone '{name}': unknown option '{unknown[0]}'; valid: {', '.join(options)}")
    return builder(embedding_size=embedding_size, input_size=input_size, **kwargs)


# Importing the modules registers their backbones.
from bench.backbones import iresnet, mobilefacenet, small  # noqa: E402,F401
