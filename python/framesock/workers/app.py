"""Finding what ``MODULE:ATTR`` names: a handler, or a JSON value to serve as a static reply."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import traceback
from typing import Any, Optional


class AppError(Exception):
    """The app cannot be loaded; the message says why (with the traceback of an exception raised
    while importing it)."""


def check_spec(spec: str) -> tuple[str, str]:
    """``MODULE:ATTR`` split in two, or ValueError for a malformed one."""
    module, sep, attr = spec.partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise ValueError(f"the app must be given as MODULE:ATTR (e.g. myservice:handler), got {spec!r}")
    return module.strip(), attr.strip()


def load(spec: str, app_dir: Optional[str] = None) -> Any:
    """The object ``MODULE:ATTR`` names, imported from ``app_dir`` (default: the current directory)."""
    module_name, attr = check_spec(spec)
    where = os.path.abspath(app_dir or os.getcwd())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name):
            raise AppError(f"cannot load {spec!r}: no module named {err.name!r} (looked in {where})") from None
        raise AppError(f"cannot load {spec!r}: importing {module_name} raised:\n{import_traceback()}") from None
    except BaseException:  # noqa: B036 (SystemExit at import is a failure to load too)
        raise AppError(f"cannot load {spec!r}: importing {module_name} raised:\n{import_traceback()}") from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise AppError(f"cannot load {spec!r}: module {module_name} has no attribute {attr!r}") from None
    if not callable(value):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise AppError(
                f"cannot load {spec!r}: {attr} is a {type(value).__name__}, neither callable (a handler)"
                f" nor a JSON value (a static reply): {err}"
            ) from None
    return value


def import_traceback() -> str:
    """The exception being handled, without the frames of this module and of importlib."""
    kind, error, trace = sys.exc_info()
    frames = [
        frame
        for frame in traceback.extract_tb(trace)
        if frame.filename not in (__file__, importlib.__file__) and not frame.filename.startswith("<frozen importlib")
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(kind, error)
    return "Traceback (most recent call last):\n" + "".join(lines).rstrip()


def is_coroutine_handler(app: Any) -> bool:
    """Whether ``app`` is a coroutine function (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(getattr(app, "__call__", None))
