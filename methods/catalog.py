"""What ``methods`` registers, read from its source without importing it: names, modules, aliases, defaults.

Ours (issue 14, item 5): ``bench list`` and ``bench --help`` must answer in well under a second, without
torch, and every method module imports torch. The registrations and the defaults are already written
once, as literals, in the source: ``register_head("name", HeadClass)`` or ``@register_method("name",
aliases=(...))`` on a class, and the keyword defaults of the constructors (:meth:`methods.base.Method.defaults`).
:func:`method_catalog` reads them with :mod:`ast`, so nothing is listed twice:

- ``bench list`` prints the catalog;
- :func:`import_method_modules` imports the modules that register methods; :data:`methods.base.METHODS`
  calls it at its first lookup (``Registry(populate=...)``), so every method is registered without anyone
  importing ``methods`` first.

tests/test_cli_startup.py checks the catalog against the registry built by importing every module.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Constructor arguments that are not hyperparameters: a head's sizes and process group
#: (``methods.base._HEAD_SIZE_ARGS``), a Method's backbone and run context (``methods.base._CONTRACT_ARGS``).
_HEAD_SIZE_ARGS = ("embedding_size", "num_classes", "dist")
_CONTRACT_ARGS = ("backbone", "ctx")
#: The registering functions of :mod:`methods.base`.
_REGISTER_HEAD, _REGISTER_METHOD = "register_head", "register_method"
#: The base class whose own constructor arguments are not hyperparameters.
_METHOD_BASE = "Method"
#: The class attribute naming the defaults that are ours or unconfirmed (:class:`methods.base.Method`).
_UNCONFIRMED = "unconfirmed_defaults"


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: the module (under ``methods``) that registers it, its aliases and its
    default hyperparameters, in the order ``defaults()`` gives them."""

    module: str
    aliases: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    #: The defaults that are ours or unconfirmed (``unconfirmed_defaults`` of the class), in defaults order.
    unconfirmed: tuple[str, ...] = ()


@dataclass
class _Class:
    """A class of the source: its bases' names and the keyword defaults of its own ``__init__`` (None: none)."""

    bases: list[str]
    init_defaults: dict[str, Any] | None
    unconfirmed: tuple[str, ...] = ()


def _literal(node: ast.expr) -> Any:
    """A default's value; its source text when it is not a literal (the catalog test then fails)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _init_defaults(cls: ast.ClassDef) -> dict[str, Any] | None:
    """The parameters of ``cls.__init__`` that have defaults, in order (None without an ``__init__``)."""
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            args = item.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            return {arg.arg: _literal(default) for arg, default in pairs}
    return None


def _unconfirmed(cls: ast.ClassDef) -> tuple[str, ...]:
    """The class body's ``unconfirmed_defaults = (...)`` (with or without an annotation), else ()."""
    for item in cls.body:
        target = item.target if isinstance(item, ast.AnnAssign) else (
            item.targets[0] if isinstance(item, ast.Assign) and len(item.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == _UNCONFIRMED and item.value is not None:
            return tuple(ast.literal_eval(item.value))
    return ()


def _registration(call: ast.expr) -> tuple[str, str, tuple[str, ...]] | None:
    """``(function, name, aliases)`` of a ``register_head(...)`` / ``register_method(...)`` call."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and call.func.id in (_REGISTER_HEAD, _REGISTER_METHOD) and call.args
            and isinstance(call.args[0], ast.Constant)):
        return None
    aliases = next((tuple(ast.literal_eval(k.value)) for k in call.keywords if k.arg == "aliases"), ())
    return call.func.id, call.args[0].value, aliases


def _scan(directory: Path) -> tuple[dict[str, _Class], list[tuple[str, str, str, tuple[str, ...], str]]]:
    """Every class of the package (by name) and every registration: (function, name, module, aliases, class)."""
    classes: dict[str, _Class] = {}
    registrations = []
    for path in sorted(directory.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if _REGISTER_HEAD not in text and _REGISTER_METHOD not in text:
            continue  # registers nothing (parsing every module would double ``bench list``'s time)
        tree = ast.parse(text, str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = _Class([b.id for b in node.bases if isinstance(b, ast.Name)],
                                            _init_defaults(node), _unconfirmed(node))
                for decorator in node.decorator_list:
                    found = _registration(decorator)
                    if found:
                        registrations.append((found[0], found[1], path.stem, found[2], node.name))
            elif isinstance(node, (ast.Expr, ast.Assign)):
                found = _registration(node.value)
                if found and len(node.value.args) > 1 and isinstance(node.value.args[1], ast.Name):
                    registrations.append((found[0], found[1], path.stem, found[2], node.value.args[1].id))
    return classes, registrations


def _lineage(classes: dict[str, _Class], name: str) -> list[str]:
    """``name`` and its first bases upwards, below :class:`methods.base.Method` (single inheritance)."""
    chain = []
    while name in classes and name not in chain and name != _METHOD_BASE:
        chain.append(name)
        name = classes[name].bases[0] if classes[name].bases else ""
    return chain


def _defaults(classes: dict[str, _Class], function: str, class_name: str) -> dict[str, Any]:
    """The defaults ``defaults()`` reports: a head's nearest ``__init__`` (as ``inspect.signature`` of the
    class) less its size arguments; a Method's ``__init__`` defaults of every class below ``Method``, the
    base's first (as :meth:`methods.base.Method.defaults`)."""
    lineage = [classes[c].init_defaults for c in _lineage(classes, class_name) if classes[c].init_defaults is not None]
    if function == _REGISTER_HEAD:
        own = lineage[0] if lineage else {}
        return {k: v for k, v in own.items() if k not in _HEAD_SIZE_ARGS}
    out: dict[str, Any] = {}
    for init in reversed(lineage):
        out.update({k: v for k, v in init.items() if k not in _CONTRACT_ARGS})
    return out


def _marked(classes: dict[str, _Class], function: str, class_name: str, defaults: dict[str, Any]) -> tuple[str, ...]:
    """The defaults marked unconfirmed, as :meth:`methods.base.Method.unconfirmed`: a head's own class's; a
    Method's, with those of every class below ``Method``."""
    lineage = _lineage(classes, class_name)
    marked = set(classes[class_name].unconfirmed) if function == _REGISTER_HEAD else {
        name for c in lineage for name in classes[c].unconfirmed}
    return tuple(name for name in defaults if name in marked)


@functools.lru_cache(maxsize=1)
def method_catalog() -> dict[str, MethodInfo]:
    """Every method registered in the source of ``methods``, by canonical name (sorted)."""
    classes, registrations = _scan(Path(__file__).resolve().parent)
    catalog = {}
    for function, name, module, aliases, class_name in registrations:
        defaults = _defaults(classes, function, class_name)
        catalog[name] = MethodInfo(module, aliases, defaults, _marked(classes, function, class_name, defaults))
    return dict(sorted(catalog.items()))


def method_modules() -> list[str]:
    """The modules that register methods, each once (``methods.<module>``)."""
    return sorted({f"methods.{info.module}" for info in method_catalog().values()})


def import_method_modules() -> None:
    """Import every module that registers a method (the ``populate`` of :data:`methods.base.METHODS`)."""
    for module in method_modules():
        importlib.import_module(module)


__all__ = ["MethodInfo", "import_method_modules", "method_catalog", "method_modules"]
