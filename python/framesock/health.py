"""The health and metrics endpoint: plain HTTP/1.1 on its own port, for balancers, Kubernetes
probes and Prometheus.

``GET /healthz`` answers ``200 ok`` while the server serves and ``503 draining`` from the
moment a drain begins (``503 starting`` before any worker serves); ``GET /metrics`` answers
the Prometheus text (see ``framesock.metrics``); anything else ``404`` (``405`` for a method
other than GET or HEAD). One connection, one answer, then the close.

One thread serves it with non-blocking sockets, so a slow or hostile peer costs only its own
connection: each has ``REQUEST_LIMIT`` seconds and ``HEAD_LIMIT`` bytes for its request, and
past ``MAX_CONNECTIONS`` at once the oldest is closed to make room.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any, Optional, Protocol, Union

from framesock import _arguments, metrics

__all__ = ["HealthEndpoint", "parse_address"]

logger = logging.getLogger("framesock.health")

REQUEST_LIMIT = 5.0
HEAD_LIMIT = 8192
MAX_CONNECTIONS = 64
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Source(Protocol):
    """What the endpoint reports on: ``health()`` is ``(serving, word)``, ``metrics()`` the text."""

    def health(self) -> tuple[bool, str]: ...

    def metrics(self) -> str: ...


class ServerSource:
    """A ``Server`` or ``aio.Server`` of this process as a ``Source``."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def health(self) -> tuple[bool, str]:
        if self.server.draining:
            return False, "draining"
        return True, "ok"

    def metrics(self) -> str:
        return metrics.text(self.server)


# "HOST:PORT" or (host, port).
_ADDRESS: _arguments.Kind = (
    lambda value: isinstance(value, str) or _arguments.is_address(value),
    "'HOST:PORT' or a (host, port) tuple",
)


def parse_address(text: Union[str, tuple[str, int]]) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9100"`` for IPv6, ``":9100"`` for all IPv4 addresses) or a
    ``(host, port)`` tuple."""
    _arguments.check("address", text, _ADDRESS)
    if isinstance(text, tuple):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"health address must be HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.started = time.monotonic()
        self.received = b""
        self.outgoing = b""


class HealthEndpoint:
    """Serves ``/healthz`` and ``/metrics`` for ``source`` (a ``Server``, an ``aio.Server``, or
    any object with ``health()`` and ``metrics()``) on ``address`` until ``close()``."""

    def __init__(self, source: Any, address: Union[str, tuple[str, int]] = ("127.0.0.1", 0)) -> None:
        if not (hasattr(source, "health") and hasattr(source, "metrics")) and not hasattr(source, "stats"):
            raise TypeError(f"source must be a Server, an aio.Server or have health() and metrics(), got {_arguments.shown(source)}")
        self.source: Source = source if hasattr(source, "health") else ServerSource(source)
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self._listener.setblocking(False)
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._connections: dict[socket.socket, _Connection] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="framesock-health", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stops serving and closes every connection; waits for the thread (at most 5 s)."""
        if self._closing:
            return
        self._closing = True
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> HealthEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _serve(self) -> None:
        try:
            while not self._closing:
                for key, events in self._selector.select(timeout=0.5):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        continue
                    else:
                        self._step(key.data, events)
                self._expire()
        except Exception:  # noqa: BLE001 - a bug here must not pass silently, nor kill the app
            logger.exception("the health endpoint stopped")
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)
            self._selector.close()
            self._listener.close()
            self._wake_read.close()
            self._wake_write.close()

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of descriptors: try again on the next round
                logger.warning("health endpoint: accept failed: %s", err)
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                oldest = min(self._connections.values(), key=lambda c: c.started)
                self._drop(oldest)
            sock.setblocking(False)
            connection = _Connection(sock)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _expire(self) -> None:
        now = time.monotonic()
        for connection in list(self._connections.values()):
            if now - connection.started > REQUEST_LIMIT:
                self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        if self._connections.pop(connection.sock, None) is not None:
            self._selector.unregister(connection.sock)
        connection.sock.close()

    def _step(self, connection: _Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not connection.outgoing:
                chunk = connection.sock.recv(4096)
                if not chunk:
                    self._drop(connection)
                    return
                connection.received += chunk
                self._answer_if_whole(connection)
            if connection.outgoing:
                sent = connection.sock.send(connection.outgoing)
                connection.outgoing = connection.outgoing[sent:]
                if not connection.outgoing:
                    self._drop(connection)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(connection)

    def _answer_if_whole(self, connection: _Connection) -> None:
        end = connection.received.find(b"\r\n\r\n")
        if end < 0:
            end = connection.received.find(b"\n\n")
        if end < 0:
            if len(connection.received) > HEAD_LIMIT:
                self._reply(connection, 431, "request head too large\n", head_only=False)
            return
        request_line = connection.received.split(b"\n", 1)[0].strip()
        self._reply(connection, *self._route(request_line))

    def _route(self, request_line: bytes) -> tuple[int, str, bool]:
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, "bad request\n", False
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/healthz", b"/metrics"):
            return 404, "not found: /healthz and /metrics are served here\n", False
        if method not in (b"GET", b"HEAD"):
            return 405, "only GET and HEAD\n", False
        head_only = method == b"HEAD"
        if target == b"/healthz":
            serving, word = self.source.health()
            return (200 if serving else 503), word + "\n", head_only
        return 200, self.source.metrics(), head_only

    def _reply(self, connection: _Connection, status: int, body: str, head_only: bool) -> None:
        payload = body.encode()
        kind = "text/plain; version=0.0.4; charset=utf-8" if body.startswith("# HELP") else "text/plain; charset=utf-8"
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "\r\n"
        )
        connection.outgoing = head.encode() + (b"" if head_only else payload)
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)


def serve_for(source: Any, address: Optional[Union[str, tuple[str, int]]]) -> Optional[HealthEndpoint]:
    """A ``HealthEndpoint`` for ``source`` when an address is given (logged), else None."""
    if address is None:
        return None
    endpoint = HealthEndpoint(source, address)
    host, port = endpoint.address
    logger.info("health and metrics on http://%s:%d/healthz and /metrics", f"[{host}]" if ":" in host else host, port)
    return endpoint


