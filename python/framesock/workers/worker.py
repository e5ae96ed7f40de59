"""One worker process: serves the supervisor's socket with the app until told to stop.

Run as ``python -m framesock.workers CONFIG`` (CONFIG is JSON, see ``Supervisor``). It
stops gracefully on SIGTERM (no more accepting, exchanges in progress finish within the
graceful timeout, kept connections get the closing handshake), quickly on SIGINT (0.1 s), and
by itself within about a second when the supervisor is gone (its end of a pipe closes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import framesock
from framesock import aio, health
from framesock.workers import app as apps
from framesock.workers import messages

logger = logging.getLogger("framesock.worker")

# SIGINT's grace, as Ctrl-C gives the blocking server.
QUICK_GRACE = 0.1
# How often the supervisor hears this worker's counters.
STATS_EVERY = 1.0
# After the supervisor is gone: how long the quick stop may take before the process just ends.
ORPHAN_EXIT = 1.5


class Worker:
    """What the worker knows about its stop: asked or not, and how long it may take."""

    def __init__(self, config: dict[str, Any], on_ready: Optional[Callable[[Any], None]] = None) -> None:
        self.config = config
        # The pipe to the supervisor; None when serving in the caller's process (``run``).
        self.report_fd: Optional[int] = config.get("report_fd")
        self.on_ready = on_ready
        self.stop_grace: Optional[float] = None
        self.wake: Callable[[], None] = lambda: None
        self.recycle_at: Optional[int] = config.get("max_requests")
        self.recycle_sent = False
        self.ready = False

    def ask_stop(self, grace: float) -> None:
        """Called from a signal handler: the shortest grace asked for wins."""
        if self.stop_grace is None or grace < self.stop_grace:
            self.stop_grace = grace
        self.wake()

    @property
    def drain_delay(self) -> float:
        """How long a graceful stop first only drains (health 503, serving on); a quick one
        (SIGINT, the supervisor gone) does not wait."""
        delay = float(self.config.get("drain_delay") or 0.0)
        return delay if self.stop_grace is not None and self.stop_grace > QUICK_GRACE else 0.0

    def announce_ready(self, address: Any) -> None:
        self.ready = True
        self.send(ready=True)
        if self.on_ready is not None:
            self.on_ready(address)

    def send(self, **message: Any) -> None:
        if self.report_fd is not None:
            messages.send(self.report_fd, **message)

    def report(self, stats: Any) -> None:
        self.send(stats=stats)
        if self.recycle_at is not None and not self.recycle_sent and stats["requests"] >= self.recycle_at:
            self.recycle_sent = True
            logger.info("served %d requests (--max-requests): asking to be replaced", stats["requests"])
            self.send(recycle=True)

    def finished(self, stats: Any) -> None:
        self.report(stats)
        logger.info("stopped: %d requests on %d connections", stats["requests"], stats["connections_accepted"])

    def server_arguments(self, app: Any) -> dict[str, Any]:
        settings = dict(self.config["settings"])
        tls = self.config.get("tls")
        if tls:
            settings["tls"] = framesock.ServerTLS(tls["cert"], tls["key"], client_ca=tls.get("client_ca"))
        if callable(app):
            settings["handler"] = app
        else:
            settings["response"] = app
        return dict(settings, **self.config["listen"], io_threads=self.config.get("io_threads"))

    def pauses(self, server: Any) -> Iterator[float]:
        """A worker's life between start and shutdown, as the waits it makes: each value is how
        long to wait next for a wake-up (a stop asked) or the time. Reports stats meanwhile;
        after a graceful stop is asked, drains for ``drain_delay`` first (a stop asked again,
        quicker, ends the drain). Shared by the blocking and the asyncio worker."""
        while self.stop_grace is None:
            yield STATS_EVERY
            self.report(server.stats())
        if self.drain_delay:
            server.drain()
            logger.info("draining: /healthz answers 503 for %g s, then the stop", self.drain_delay)
            grace = self.stop_grace
            deadline = time.monotonic() + self.drain_delay
            while self.stop_grace == grace and time.monotonic() < deadline:
                yield min(STATS_EVERY, max(0.0, deadline - time.monotonic()))

    def serve_blocking(self, app: Any) -> None:
        event = threading.Event()
        self.wake = event.set
        server = framesock.Server(**self.server_arguments(app))
        server.start()
        endpoint = health.serve_for(server, self.config.get("health"))
        try:
            self.announce_ready(server.address)
            for pause in self.pauses(server):
                event.wait(pause)
                event.clear()  # the next pause re-checks what a wake-up would have said
            server.shutdown(timeout=self.stop_grace)
        finally:
            if endpoint is not None:
                endpoint.close()
        self.finished(server.stats())

    async def serve_async(self, app: Any) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        self.wake = wake
        server = aio.Server(**self.server_arguments(app))
        await server.start()
        endpoint = health.serve_for(server, self.config.get("health"))
        try:
            self.announce_ready(server.address)
            for pause in self.pauses(server):
                try:
                    await asyncio.wait_for(event.wait(), pause)
                except asyncio.TimeoutError:
                    pass
                event.clear()
            await server.shutdown(timeout=self.stop_grace)
        finally:
            if endpoint is not None:
                endpoint.close()
        self.finished(server.stats())


def watch_supervisor(fd: int, worker: Worker) -> None:
    """Waits for the supervisor's end of the pipe to close (it never writes): then stops."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    logger.warning("the supervisor is gone: stopping")
    worker.ask_stop(QUICK_GRACE)
    # Should the stop hang (a handler that never returns), the process ends anyway.
    threading.Timer(ORPHAN_EXIT, os._exit, args=(1,)).start()


def event_loop_factory(choice: str) -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """The loop coroutine handlers run on: uvloop when asked for or installed (``auto``)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if choice == "uvloop":
            raise apps.AppError("--loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]


def serve(worker: Worker, app: Any, loop: str = "auto") -> None:
    """Serves ``app`` until the worker is asked to stop."""
    if apps.is_coroutine_handler(app):
        factory = event_loop_factory(loop)
        event_loop = factory() if factory else asyncio.new_event_loop()
        try:
            event_loop.run_until_complete(worker.serve_async(app))
        finally:
            event_loop.close()
    else:
        worker.serve_blocking(app)


def handle_stop_signals(worker: Worker, graceful_timeout: float) -> dict[int, Any]:
    """SIGTERM stops gracefully, SIGINT quickly; returns the handlers they had."""

    def on_signal(signum: int, _frame: Any) -> None:
        worker.ask_stop(graceful_timeout if signum == signal.SIGTERM else QUICK_GRACE)

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    logging.basicConfig(
        level=config.get("log_level", "INFO"),
        format=f"%(asctime)s [worker {config['worker']}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config["listen"] = {"fd": config["fd"]}
    worker = Worker(config)
    handle_stop_signals(worker, config["graceful_timeout"])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's business
    threading.Thread(target=watch_supervisor, args=(config["life_fd"], worker), daemon=True).start()
    try:
        app = apps.load(config["app"], config.get("app_dir"))
        if apps.is_coroutine_handler(app):
            event_loop_factory(config.get("loop", "auto"))
        serve(worker, app, config.get("loop", "auto"))
    except apps.AppError as err:
        worker.send(failed=str(err))
        return 3
    except Exception as err:
        if worker.ready:
            raise
        # Not serving yet (bad TLS files, a setting the server refuses): the same for every
        # worker, so the supervisor stops instead of starting it again and again.
        worker.send(failed=f"cannot serve {config['app']!r}: {type(err).__name__}: {err}")
        return 3
    return 0

