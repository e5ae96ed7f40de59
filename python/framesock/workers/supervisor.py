"""The supervisor: keeps N workers serving one socket, replaces the ones that die, and answers
the signals systemd and Kubernetes send.

SIGTERM stops gracefully (workers finish the exchanges in progress, up to the graceful timeout),
SIGINT quickly (0.1 s), a second one of either at once (SIGKILL). SIGHUP replaces the workers one
at a time, each new one serving before the old one stops accepting; ``max_requests`` does the
same for one worker. Works as PID 1: it reaps every child, its own or adopted.

With a health address it serves ``/healthz`` and ``/metrics`` (framesock.health) for all its
workers: the sum of their counters, exited workers' included, and per worker slot. With a
drain delay, SIGTERM first turns ``/healthz`` to 503 for that long while every worker serves on,
so that balancers stop sending connections before any worker stops accepting.
"""

from __future__ import annotations

import json
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional, cast

from framesock import health
from framesock.metrics import render as render_metrics
from framesock.workers import listen as listening
from framesock.workers import messages

logger = logging.getLogger("framesock.supervisor")

EXIT_OK = 0
EXIT_APP = 3  # the app cannot be loaded or served
EXIT_CRASH_LOOP = 4  # workers keep dying soon after they start

# A worker dying within this many seconds of its start counts towards a crash loop ...
EARLY_DEATH = 10.0
# ... and this many early deaths within that window stop the program.
CRASH_LOOP = 5
# How much longer than its grace a stopping worker gets before SIGKILL.
KILL_AFTER = 5.0
# The quick stop's grace (SIGINT), as Ctrl-C gives the blocking server.
QUICK_GRACE = 0.1
# Counters that are a worker's state now, not a running total.
GAUGES = ("connections_active", "bytes_buffered", "requests_in_progress", "handler_calls_waiting")


def describe_exit(status: int) -> str:
    """An exit status as words: ``exit status 1``, ``killed by SIGKILL``."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def add_counters(total: dict[str, Any], stats: dict[str, Any], gauges: bool = True) -> None:
    """Adds ``stats`` into ``total`` (nested dicts too); gauges only if asked."""
    for key, value in stats.items():
        if isinstance(value, dict):
            inner: dict[str, Any] = total.setdefault(key, {})
            add_counters(inner, cast("dict[str, Any]", value), gauges)
        elif isinstance(value, (int, float)) and (gauges or key not in GAUGES):
            total[key] = total.get(key, 0) + value


class Worker:
    """A worker process as the supervisor sees it."""

    def __init__(
        self, number: int, slot: int, process: subprocess.Popen[bytes], report: int, replacing: Optional[Worker]
    ) -> None:
        self.number = number
        self.slot = slot
        self.process = process
        self.report = report
        self.reader = messages.Reader()
        self.started = time.monotonic()
        self.replacing = replacing
        self.ready = False
        self.stopping = False
        self.failed: Optional[str] = None
        self.stats: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def __str__(self) -> str:
        return f"worker {self.number} (pid {self.pid})"

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


class Supervisor:
    """N worker processes serving one listening socket (see the module's doc).

    ``settings`` are ``Server`` keyword arguments (``protocol``, ``timeout``...), ``tls`` the
    paths ``{"cert", "key", "client_ca"}``. Call ``run()`` on the main thread.
    """

    def __init__(
        self,
        app: str,
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int = 8000,
        path: Optional[str] = None,
        backlog: int = 1024,
        settings: Optional[dict[str, Any]] = None,
        tls: Optional[dict[str, Optional[str]]] = None,
        graceful_timeout: float = 25.0,
        max_requests: Optional[int] = None,
        loop: str = "auto",
        app_dir: Optional[str] = None,
        io_threads: Optional[int] = None,
        log_level: str = "INFO",
        health: Optional[str] = None,
        drain_delay: float = 0.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be 1 or more, got {workers}")
        if max_requests is not None and max_requests < 1:
            raise ValueError(f"max_requests must be 1 or more, got {max_requests}")
        self.app = app
        if drain_delay < 0:
            raise ValueError(f"drain_delay must be 0 or more, got {drain_delay}")
        self.count = workers
        self.graceful_timeout = graceful_timeout
        self.health_address = health
        self.drain_delay = drain_delay
        # Set when SIGTERM begins a drain: /healthz answers 503, and at this time the stop begins.
        self.drain_ends: Optional[float] = None
        self.max_requests = max_requests
        self.config: dict[str, Any] = {
            "app": app,
            "app_dir": os.path.abspath(app_dir) if app_dir else os.getcwd(),
            "settings": dict(settings or {}),
            "tls": tls,
            "graceful_timeout": graceful_timeout,
            "loop": loop,
            "io_threads": io_threads if io_threads is not None else share_of_cores(workers),
            "log_level": log_level,
        }
        self.sockets = listening.listen(host, port, path, backlog, workers)
        self.socket_file = listening.socket_file(self.sockets[0])
        self.workers: list[Worker] = []
        self.numbers = 0
        self.retired: dict[str, Any] = {}
        # Per worker slot, the counters of its workers that have exited (for per-worker series).
        self.retired_slots: dict[int, dict[str, Any]] = {}
        # The health endpoint's thread reads what the main thread changes.
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.signals: list[int] = []
        self.to_replace: list[Worker] = []
        self.early_deaths: list[float] = []
        self.stopping: Optional[int] = None
        self.kill_at: Optional[float] = None
        self.status = EXIT_OK
        self.life_read, self.life_write = os.pipe()

    @property
    def address(self) -> Any:
        """The bound address: ``(host, port)`` (the real port with 0), or the socket path."""
        return self.sockets[0].getsockname()

    def stats(self) -> dict[str, Any]:
        """Every worker's counters summed (as last reported, once a second), those of workers
        that have exited included; ``workers`` is how many run now."""
        total: dict[str, Any] = {}
        with self.lock:
            add_counters(total, self.retired)
            for worker in self.workers:
                add_counters(total, worker.stats)
            total["workers"] = len(self.workers)
        return total

    def slot_stats(self) -> dict[str, dict[str, Any]]:
        """Per worker slot (``"0"``, ``"1"``...): its workers' counters, exited ones included."""
        slots: dict[str, dict[str, Any]] = {}
        with self.lock:
            for slot in range(self.count):
                total: dict[str, Any] = {}
                add_counters(total, self.retired_slots.get(slot, {}))
                for worker in self.workers:
                    if worker.slot == slot:
                        add_counters(total, worker.stats)
                slots[str(slot)] = total
        return slots

    # The health endpoint's source (see framesock.health).
    def health(self) -> tuple[bool, str]:
        if self.drain_ends is not None or self.stopping is not None:
            return False, "draining"
        if not any(worker.ready and not worker.stopping for worker in list(self.workers)):
            return False, "starting"
        return True, "ok"

    def metrics(self) -> str:
        serving = sum(1 for worker in list(self.workers) if worker.ready and not worker.stopping)
        return render_metrics(self.stats(), self.slot_stats(), workers=serving)

    def run(self, ready: Optional[Callable[[Any], None]] = None) -> int:
        """Starts the workers and supervises them until stopped; returns the exit status."""
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wake_write.fileno())
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {signum: signal.signal(signum, self.on_signal) for signum in handled}
        self.selector.register(wake_read, selectors.EVENT_READ)
        endpoint = None
        try:
            endpoint = health.serve_for(self, self.health_address)
            if ready is not None:
                ready(self.address)
            for slot in range(self.count):
                self.spawn(slot)
            while self.workers or self.stopping is None:
                for key, _ in self.selector.select(timeout=0.25):
                    if key.fileobj is wake_read:
                        drain(wake_read)
                    else:
                        self.read_reports(key.data)
                self.handle_signals()
                self.reap()
                self.step()
        finally:
            if endpoint is not None:
                endpoint.close()
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
            self.reap(wait=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_wakeup)
            self.selector.close()
            wake_read.close()
            wake_write.close()
            os.close(self.life_write)
            os.close(self.life_read)
            for sock in self.sockets:
                sock.close()
            listening.remove_socket_file(self.socket_file)
        total = self.stats()
        logger.info(
            "stopped: %d requests on %d connections, %d errors",
            total.get("requests", 0),
            total.get("connections_accepted", 0),
            sum(total.get("errors", {}).values()),
        )
        return self.status

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue
            if signum == signal.SIGHUP:
                if self.stopping is None:
                    logger.info("SIGHUP: replacing the workers one at a time")
                    self.to_replace = [w for w in self.workers if w.ready and not w.stopping and w.replacing is None]
                continue
            if self.stopping is not None:
                logger.warning("%s during the stop: stopping at once", signal.Signals(signum).name)
                for worker in self.workers:
                    worker.signal(signal.SIGKILL)
                continue
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM and self.drain_delay > 0 and self.drain_ends is None:
                # First the balancers see /healthz fail, while every worker still serves.
                logger.info("%s: draining: /healthz answers 503 for %g s, then the stop", name, self.drain_delay)
                self.drain_ends = time.monotonic() + self.drain_delay
                continue
            self.drain_ends = None
            grace = self.graceful_timeout if signum == signal.SIGTERM else QUICK_GRACE
            logger.info("%s: stopping, up to %g s for the exchanges in progress", name, grace)
            self.stop(signum, grace)

    def stop(self, signum: int, grace: float, failed: bool = False) -> None:
        self.drain_ends = None
        self.stopping = signum
        self.to_replace = []
        self.kill_at = time.monotonic() + grace + KILL_AFTER
        for worker in self.workers:
            worker.stopping = True
            if worker.ready:
                worker.signal(signum)
            else:
                # Still starting (maybe before its signal handlers): nothing to finish; after a
                # failure to load, it would only fail the same way.
                worker.signal(signal.SIGKILL if failed else signal.SIGTERM)

    def spawn(self, slot: int, replacing: Optional[Worker] = None) -> Worker:
        """Starts a worker on ``slot``'s socket (the Unix socket is every slot's)."""
        self.numbers += 1
        listener = self.sockets[slot % len(self.sockets)]
        report_read, report_write = os.pipe()
        config = dict(
            self.config,
            worker=self.numbers,
            fd=listener.fileno(),
            report_fd=report_write,
            life_fd=self.life_read,
            max_requests=jittered(self.max_requests),
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "framesock.workers", json.dumps(config)],
                pass_fds=(listener.fileno(), report_write, self.life_read),
                # Its own session: a terminal's Ctrl-C reaches the supervisor alone, which passes it on.
                start_new_session=True,
            )
        finally:
            os.close(report_write)
        os.set_blocking(report_read, False)
        worker = Worker(self.numbers, slot, process, report_read, replacing)
        self.selector.register(report_read, selectors.EVENT_READ, worker)
        self.workers.append(worker)
        logger.info("%s started%s", worker, f" to replace {replacing}" if replacing else "")
        return worker

    def read_reports(self, worker: Worker) -> None:
        while True:
            try:
                data = os.read(worker.report, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(worker.report)
                return
            for message in worker.reader.feed(data):
                self.on_message(worker, message)

    def on_message(self, worker: Worker, message: dict[str, Any]) -> None:
        if message.get("ready"):
            worker.ready = True
            logger.info("%s serving", worker)
            old = worker.replacing
            if old is not None and old in self.workers and not old.stopping:
                logger.info("%s replaced by %s: it stops accepting and drains", old, worker)
                old.stopping = True
                old.signal(signal.SIGTERM)
            worker.replacing = None
        elif isinstance(message.get("stats"), dict):
            worker.stats = message["stats"]
        elif message.get("failed"):
            worker.failed = str(message["failed"])
        elif message.get("recycle") and self.stopping is None and worker not in self.to_replace:
            self.to_replace.append(worker)

    def reap(self, wait: bool = False) -> None:
        """Collects every child that has ended; as PID 1 also those it adopted."""
        for worker in list(self.workers):
            try:
                pid, status = os.waitpid(worker.pid, 0 if wait else os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == worker.pid:
                self.ended(worker, status)
        if os.getpid() == 1:
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break

    def ended(self, worker: Worker, status: int) -> None:
        worker.process.returncode = os.waitstatus_to_exitcode(status)
        if worker.report in self.selector.get_map():
            self.read_reports(worker)
            if worker.report in self.selector.get_map():
                self.selector.unregister(worker.report)
        os.close(worker.report)
        with self.lock:
            self.workers.remove(worker)
            add_counters(self.retired, worker.stats, gauges=False)
            add_counters(self.retired_slots.setdefault(worker.slot, {}), worker.stats, gauges=False)
        how = describe_exit(status)
        if worker.failed is not None or (worker.process.returncode == EXIT_APP and not worker.ready):
            if self.stopping is None:
                # Printed once: every other worker would fail the same way.
                logger.error("%s", worker.failed or f"{worker} could not start ({how})")
                self.status = EXIT_APP
                self.stop(signal.SIGINT, QUICK_GRACE, failed=True)
            return
        if worker.stopping or self.stopping is not None:
            logger.info("%s stopped (%s)", worker, how)
            return
        now = time.monotonic()
        for other in self.workers:
            if other.replacing is worker:
                logger.warning("%s died (%s); its replacement is already starting", worker, how)
                other.replacing = None
                return
        logger.warning("%s died (%s); starting another", worker, how)
        if now - worker.started < EARLY_DEATH:
            self.early_deaths = [t for t in self.early_deaths if now - t < EARLY_DEATH] + [now]
            if len(self.early_deaths) >= CRASH_LOOP:
                logger.error(
                    "workers keep dying soon after starting (%d within %g s): stopping", CRASH_LOOP, EARLY_DEATH
                )
                self.status = EXIT_CRASH_LOOP
                self.stop(signal.SIGINT, QUICK_GRACE)
                return
        self.spawn(worker.slot, replacing=worker.replacing)

    def step(self) -> None:
        """Ends a drain's delay, moves a rolling replacement on, and ends a stop that takes
        too long."""
        if self.drain_ends is not None and time.monotonic() >= self.drain_ends:
            logger.info("drained: stopping, up to %g s for the exchanges in progress", self.graceful_timeout)
            self.stop(signal.SIGTERM, self.graceful_timeout)
        if self.kill_at is not None and time.monotonic() > self.kill_at:
            for worker in self.workers:
                logger.warning("%s did not stop in time: SIGKILL", worker)
                worker.signal(signal.SIGKILL)
            self.kill_at = None
        if self.stopping is not None or any(w.replacing is not None for w in self.workers):
            return
        while self.to_replace:
            old = self.to_replace.pop(0)
            if old in self.workers and not old.stopping:
                self.spawn(old.slot, replacing=old)
                return


def share_of_cores(workers: int) -> int:
    """I/O threads per worker: the cores shared out, at least one each."""
    cores = os.cpu_count() or 1
    return max(1, cores // workers)


def jittered(max_requests: Optional[int]) -> Optional[int]:
    """``max_requests`` plus up to 10 %, so that workers started together are not all replaced
    at the same moment."""
    if max_requests is None:
        return None
    return max_requests + random.randint(0, max_requests // 10)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass
