"""``framesock.run()``: serve an app until a signal says stop, in worker processes or here."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Literal, Optional, Union, overload

from framesock import _arguments
from framesock.types import AsyncHandler, RequestAs
from framesock.workers import supervisor as supervising
from framesock.workers import worker as working

logger = logging.getLogger("framesock.supervisor")

# What run()'s own arguments take (`Server`'s settings are `_arguments.SERVER_SETTINGS`).
RUN_ARGUMENTS = {
    "workers": _arguments.INT, "host": _arguments.STR, "port": _arguments.INT,
    "path": _arguments.PATH_OR_NONE, "backlog": _arguments.INT, "tls_cert": _arguments.PATH_OR_NONE,
    "tls_key": _arguments.PATH_OR_NONE, "tls_client_ca": _arguments.PATH_OR_NONE,
    "graceful_timeout": _arguments.NUMBER, "max_requests": _arguments.INT_OR_NONE, "loop": _arguments.STR,
    "app_dir": _arguments.PATH_OR_NONE, "io_threads": _arguments.INT_OR_NONE, "log_level": _arguments.STR_OR_NONE,
    "ready": _arguments.CALLABLE_OR_NONE, "health": _arguments.STR_OR_NONE, "drain_delay": _arguments.NUMBER,
    "request_as": _arguments.STR,
}  # fmt: skip


@overload
def run(
    app: Union[str, AsyncHandler[str]],
    *,
    request_as: Literal["text"] = "text",
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    path: Optional[str] = None,
    backlog: int = 1024,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_client_ca: Optional[str] = None,
    graceful_timeout: float = 25.0,
    max_requests: Optional[int] = None,
    loop: str = "auto",
    app_dir: Optional[str] = None,
    io_threads: Optional[int] = None,
    log_level: Optional[str] = None,
    ready: Optional[Callable[[Any], None]] = None,
    health: Optional[str] = None,
    drain_delay: float = 0.0,
    **settings: Any,
) -> int: ...


@overload
def run(
    app: Union[str, AsyncHandler[bytes]],
    *,
    request_as: Literal["bytes"],
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    path: Optional[str] = None,
    backlog: int = 1024,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_client_ca: Optional[str] = None,
    graceful_timeout: float = 25.0,
    max_requests: Optional[int] = None,
    loop: str = "auto",
    app_dir: Optional[str] = None,
    io_threads: Optional[int] = None,
    log_level: Optional[str] = None,
    ready: Optional[Callable[[Any], None]] = None,
    health: Optional[str] = None,
    drain_delay: float = 0.0,
    **settings: Any,
) -> int: ...


@overload
def run(
    app: Union[str, AsyncHandler[Any]],
    *,
    request_as: Literal["json"],
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    path: Optional[str] = None,
    backlog: int = 1024,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_client_ca: Optional[str] = None,
    graceful_timeout: float = 25.0,
    max_requests: Optional[int] = None,
    loop: str = "auto",
    app_dir: Optional[str] = None,
    io_threads: Optional[int] = None,
    log_level: Optional[str] = None,
    ready: Optional[Callable[[Any], None]] = None,
    health: Optional[str] = None,
    drain_delay: float = 0.0,
    **settings: Any,
) -> int: ...


def run(
    app: Union[str, AsyncHandler[Any]],
    *,
    request_as: RequestAs = "text",
    workers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    path: Optional[str] = None,
    backlog: int = 1024,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    tls_client_ca: Optional[str] = None,
    graceful_timeout: float = 25.0,
    max_requests: Optional[int] = None,
    loop: str = "auto",
    app_dir: Optional[str] = None,
    io_threads: Optional[int] = None,
    log_level: Optional[str] = None,
    ready: Optional[Callable[[Any], None]] = None,
    health: Optional[str] = None,
    drain_delay: float = 0.0,
    **settings: Any,
) -> int:
    """Serves ``app`` until SIGTERM (graceful stop: exchanges in progress get up to
    ``graceful_timeout`` seconds) or SIGINT (0.1 s); blocks, on the main thread.

    ``app`` is ``"module:attr"`` (a handler, plain or coroutine function, or a JSON value served
    as a static reply), served by ``workers`` processes under a supervisor that replaces a
    worker that dies and on SIGHUP replaces them all one at a time with freshly imported code;
    or a callable, served in this process (``workers`` must be 1). ``settings`` are ``Server``'s
    keyword arguments (``protocol``, ``request_as``, ``timeout``...); ``ready(address)`` is called
    once the socket is bound (before any worker serves). Logging goes to stderr at
    ``log_level`` (default INFO) unless the program has set logging up already.

    ``health="HOST:PORT"`` serves ``/healthz`` and ``/metrics`` there (see framesock.health;
    under workers, the supervisor serves them for all of them). ``drain_delay``: on SIGTERM,
    ``/healthz`` first answers 503 for this many seconds while serving goes on, so that
    balancers stop sending connections before the server stops accepting.

    Returns the exit status ``framesock-server`` gives: 0 after a requested stop, 3 when the
    app cannot be loaded or served, 4 when workers keep dying soon after starting.
    """
    _arguments.check_all(
        {
            "workers": workers, "host": host, "port": port, "path": path, "backlog": backlog,
            "tls_cert": tls_cert, "tls_key": tls_key, "tls_client_ca": tls_client_ca,
            "graceful_timeout": graceful_timeout, "max_requests": max_requests, "loop": loop,
            "app_dir": app_dir, "io_threads": io_threads, "log_level": log_level, "ready": ready,
            "health": health, "drain_delay": drain_delay, "request_as": request_as,
        },
        RUN_ARGUMENTS,
    )  # fmt: skip
    _arguments.check_all(settings, _arguments.SERVER_SETTINGS, unknown="run")
    settings["request_as"] = request_as
    level = (log_level or "INFO").upper()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("framesock.run() handles signals, so it runs on the main thread")
    tls = {"cert": tls_cert, "key": tls_key, "client_ca": tls_client_ca} if tls_cert or tls_key else None
    if isinstance(app, str):
        supervisor = supervising.Supervisor(
            app,
            workers=workers,
            host=host,
            port=port,
            path=path,
            backlog=backlog,
            settings=settings,
            tls=tls,
            graceful_timeout=graceful_timeout,
            max_requests=max_requests,
            loop=loop,
            app_dir=app_dir,
            io_threads=io_threads,
            log_level=level,
            health=health,
            drain_delay=drain_delay,
        )
        return supervisor.run(ready)
    if not callable(app):
        raise TypeError(f"app must be 'module:attr' or a callable, got {type(app).__name__}")
    if workers != 1 or max_requests is not None:
        raise ValueError("workers and max_requests need the app as 'module:attr', which each worker imports")
    config: dict[str, Any] = {
        "app": getattr(app, "__qualname__", repr(app)),
        "settings": settings,
        "tls": tls,
        "listen": {"host": host, "port": port, "path": path, "backlog": backlog},
        "io_threads": io_threads,
        "health": health,
        "drain_delay": drain_delay,
    }
    if drain_delay < 0:
        raise ValueError(f"drain_delay must be 0 or more, got {drain_delay}")
    worker = working.Worker(config, on_ready=ready)
    previous = working.handle_stop_signals(worker, graceful_timeout)
    try:
        working.serve(worker, app, loop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    logger.info("stopped")
    return supervising.EXIT_OK
