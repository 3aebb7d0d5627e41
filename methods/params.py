"""Reading and checking typed values: one coercion function and one validation helper for the project.

ours: the run configuration (``bench.config``) and every method's parameters read values from YAML
presets and ``--set key=value`` on the command line, which give strings, ints and bools. Both go through
:func:`coerce`, so a value is read the same way wherever it is set (``train.amp=off`` and
``method_params.dcq.shuffle_bn=off`` alike). This module imports nothing but
:mod:`methods.errors`, so ``bench`` can use it without importing torch.
"""

from __future__ import annotations

import typing
from typing import Any

from methods.errors import ConfigError

#: Words read as booleans (case-insensitive): YAML 1.1's spellings and 1/0.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}


def require(condition: bool, message: str, owner: str = "") -> None:
    """Raise :class:`ConfigError` ``"<owner>: <message>"`` (just ``message`` when ``owner`` is empty)
    unless ``condition`` holds (``owner``: e.g. ``method 'dcq'`` or a preset's path)."""
    if not condition:
        raise ConfigError(f"{owner}: {message}" if owner else message)


def coerce(value: Any, kind: Any, what: str) -> Any:
    """``value`` read as type ``kind``: bool, int, float, str, ``list[str]``, or any other type (kept
    when ``value`` is an instance of it; ``None`` accepts anything).

    - bool: a bool, or one of :data:`BOOL_WORDS`;
    - int: an int (not a bool), or a number text with an integral value (``"1e3"``, ``"1_000"``);
    - float: an int or float (not a bool), or a number text;
    - str: a str (stripped) or a number;
    - ``list[str]``: a list/tuple, or a comma-separated text; empty items dropped.

    Anything else is a ConfigError ``"<what> must be <type>, got <value>"``.
    """
    if kind is None or kind is type(None):
        return value
    if typing.get_origin(kind) is list:
        return _as_list(value, what)
    reader = _READERS.get(kind)
    if reader is None:
        if isinstance(value, kind):
            return value
    else:
        try:
            return reader(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{what} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _as_list(value: Any, what: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{what} must be a list, got {value!r}")
    return [str(item).strip() for item in items if str(item).strip()]


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if isinstance(value, (str, int)) and word in BOOL_WORDS:
        return BOOL_WORDS[word]
    raise ValueError(value)


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    number = float(str(value).strip().replace("_", ""))
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(str(value).strip().replace("_", "")) if isinstance(value, str) else float(value)


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(value)


_READERS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}
