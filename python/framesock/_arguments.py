"""Checks on the arguments of framesock's Python-level entry points (``run``, ``aio``,
``HealthEndpoint``), worded as the engine words its own: ``port must be an int, got str
'8000'``. The engine's entry points check theirs in Rust (``src/py/named.rs``)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple, cast

# What each kind of argument takes: a test, and how a message says it.
Kind = Tuple[Callable[[Any], bool], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_address(value: Any) -> bool:
    """A ``(host, port)`` tuple."""
    if not isinstance(value, tuple):
        return False
    pair = cast(Tuple[object, ...], value)
    return len(pair) == 2 and isinstance(pair[0], str) and _is_int(pair[1])


def _or_none(kind: Kind) -> Kind:
    test, what = kind
    return (lambda value: value is None or test(value)), f"{what} or None"


INT: Kind = (_is_int, "an int")
NUMBER: Kind = (_is_number, "a number")
STR: Kind = (lambda value: isinstance(value, str), "a str")
BOOL: Kind = (lambda value: isinstance(value, bool), "a bool")
PATH: Kind = (lambda value: isinstance(value, (str, os.PathLike)), "a str or os.PathLike")
CALLABLE: Kind = (callable, "callable")
STRINGS: Kind = (
    lambda value: not isinstance(value, (str, bytes)) and _iterable(value) and all(isinstance(item, str) for item in value),
    "a list of str",
)
ADDRESSES: Kind = (
    lambda value: not isinstance(value, (str, bytes)) and _iterable(value) and all(is_address(item) for item in value),
    "a list of (host, port)",
)
INT_OR_NONE = _or_none(INT)
NUMBER_OR_NONE = _or_none(NUMBER)
STR_OR_NONE = _or_none(STR)
BOOL_OR_NONE = _or_none(BOOL)
PATH_OR_NONE = _or_none(PATH)
CALLABLE_OR_NONE = _or_none(CALLABLE)
STRINGS_OR_NONE = _or_none(STRINGS)
ADDRESSES_OR_NONE = _or_none(ADDRESSES)

# `Server`'s keyword settings, as `run(**settings)` passes them on to each worker.
SERVER_SETTINGS: Dict[str, Kind] = {
    "protocol": STR,
    "request_as": STR,
    "timeout": NUMBER_OR_NONE,
    "idle_timeout": NUMBER_OR_NONE,
    "max_frame": INT,
    "max_connections": INT,
    "max_connections_per_address": INT_OR_NONE,
    "handler_threads": INT_OR_NONE,
    "max_unsent": INT,
    "max_buffered": INT,
    "proxy_protocol": BOOL,
    "proxy_from": STRINGS_OR_NONE,
}


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def shown(value: Any, most: int = 40) -> str:
    """``TYPE REPR``, the repr cut to ``most`` characters, as the engine shows a value."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the argument's own error
        text = "<no repr>"
    if len(text) > most:
        text = text[:most] + "..."
    return f"{type(value).__name__} {text}"


def check(name: str, value: Any, kind: Kind) -> None:
    """TypeError ``NAME must be WHAT, got TYPE REPR`` unless ``value`` is of ``kind``."""
    test, what = kind
    if not test(value):
        raise TypeError(f"{name} must be {what}, got {shown(value)}")


def check_all(given: Dict[str, Any], kinds: Dict[str, Kind], unknown: Optional[str] = None) -> None:
    """Checks every argument of ``given`` that ``kinds`` knows; with ``unknown`` (the function's
    name), one it does not know is a TypeError as Python raises it."""
    for name, value in given.items():
        if name in kinds:
            check(name, value, kinds[name])
        elif unknown is not None:
            raise TypeError(f"{unknown}() got an unexpected keyword argument {name!r}")
