"""FaceBench methods: one module per paper, each a drop-in ``nn.Module`` that imports only torch.

Importing this package is light (no torch): ``bench --help`` and ``bench list`` run without it (issue 14,
item 5). The names below are re-exported lazily (PEP 562 ``__getattr__``) from :mod:`methods.base`
(``from methods import dcq`` imports a submodule as usual). :data:`methods.base.METHODS` registers every
method at its first lookup (:func:`methods.catalog.import_method_modules`), so nobody needs to import the method
modules first.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Names re-exported from :mod:`methods.base`, imported when first used.
_FROM_BASE = ("METHODS", "BatchSpec", "LossOutput", "Method", "MethodContext", "build_method")


def __getattr__(name: str) -> Any:
    """``methods.METHODS`` etc., imported from :mod:`methods.base` when first used (PEP 562)."""
    if name in _FROM_BASE:
        return getattr(importlib.import_module("methods.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_FROM_BASE)
