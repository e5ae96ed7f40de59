"""Peers and fixtures shared by the tests.

The peers are plain-socket Python programs written here: ones that behave like the seed's scripts
(single bare ``recv`` calls, ``recv(1024)``) and hostile ones that break the wire format. Every
server binds 127.0.0.1 port 0 and every thread started here is joined before the test ends.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import framesock

SEED_MESSAGE = b"msg from client"
SEED_REPLY = b'{"key": "id", "val": 123}'


# pytest-asyncio (1.2) asks for the current event loop before each async test; until one was
# set, Python 3.9 makes a new one then, which is never closed and fails a later test with an
# "unclosed event loop" ResourceWarning. Saying "no current loop" makes it get None instead.
asyncio.set_event_loop(None)


def pytest_report_header() -> str:
    # Which framesock is under test: this checkout's build, or an installed wheel.
    return f"framesock {framesock.__version__} from {Path(framesock.__file__).parent}"


def frame(payload: bytes) -> bytes:
    """A request frame: 4-byte big-endian length, then the payload."""
    return struct.pack(">I", len(payload)) + payload


class PeerThread(threading.Thread):
    """Runs ``target`` in a thread and keeps its result or exception for ``outcome()``."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test by outcome()
            self.error = err

    def outcome(self, timeout: float = 10.0) -> Any:
        """The target's return value; re-raises its exception; fails if it is still running."""
        self.join(timeout)
        assert not self.is_alive(), "peer thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class RawServer:
    """A one-connection TCP server on 127.0.0.1:0 whose behaviour is a function of the socket."""

    def __init__(self, behaviour: Callable[[socket.socket], Any]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(5)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = PeerThread(self._serve)
        self._behaviour = behaviour
        self.thread.start()

    def _serve(self) -> Any:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            return self._behaviour(conn)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def raw_server():
    """Factory: ``raw_server(behaviour)`` starts a RawServer and stops it after the test."""
    started: list[RawServer] = []

    def start(behaviour: Callable[[socket.socket], Any]) -> RawServer:
        server = RawServer(behaviour)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def seed_style_server(conn: socket.socket, reply: bytes = SEED_REPLY) -> bytes:
    """What the seed's server does with a connection: two bare recv calls, reply, close."""
    length = int.from_bytes(conn.recv(4), byteorder="big")
    data = conn.recv(length)
    conn.sendall(reply)
    return data


def seed_style_client(port: int, message: bytes = SEED_MESSAGE) -> Any:
    """What the seed's client does: one sendall of header + payload, one recv(1024), json.loads."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(frame(message))
        return json.loads(sock.recv(1024))


def raw_exchange(port: int, data: bytes, *, family: int = socket.AF_INET, host: str = "127.0.0.1") -> bytes:
    """Sends ``data`` and returns every byte the server sends until it closes."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class FramesockServer:
    """``start_server`` running in a thread on port 0; ``port`` is known once it listens."""

    def __init__(self, **kwargs: Any) -> None:
        self._listening = threading.Event()
        self.address: tuple | None = None
        kwargs.setdefault("port", 0)
        kwargs.setdefault("timeout", 5.0)
        self.thread = PeerThread(lambda: framesock.start_server(ready=self._ready, **kwargs))
        self.thread.start()
        if not self._listening.wait(10):
            self.thread.outcome(0.1)  # raises the start-up error, if there was one
            raise AssertionError("start_server did not start listening")

    def _ready(self, address: tuple) -> None:
        self.address = address
        self._listening.set()

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    def outcome(self, timeout: float = 10.0) -> Any:
        return self.thread.outcome(timeout)

    def release(self) -> None:
        """Ends a server still waiting for its client by connecting and leaving at once."""
        if self.thread.is_alive():
            try:
                socket.create_connection(self.address[:2], timeout=1).close()
            except OSError:
                pass
            self.thread.join(10)


@pytest.fixture
def framesock_server():
    """Factory: ``framesock_server(**start_server_kwargs)``; stops what it started."""
    started: list[FramesockServer] = []

    def start(**kwargs: Any) -> FramesockServer:
        server = FramesockServer(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.release()


@pytest.fixture
def start_server():
    """Factory: ``start_server(*args, **kwargs)`` makes a ``framesock.Server`` (port 0 unless
    given), starts it, and shuts it down after the test."""
    started: list[framesock.Server] = []

    def start(*args, **kwargs) -> framesock.Server:
        kwargs.setdefault("port", 0)
        server = framesock.Server(*args, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown(timeout=2.0)


def open_files() -> collections.Counter:
    """What the open descriptors refer to (a socket's or a pipe's inode), counted: a file left
    open shows up even if a descriptor from before the test closed meanwhile."""
    found: collections.Counter = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[os.readlink(f"/proc/self/fd/{fd}")] += 1
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return found


def wait_until(condition, timeout: float = 10.0) -> None:
    """Polls ``condition()`` until it holds; fails the test if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def read_reply_frame(sock: socket.socket) -> tuple[bool, bytes]:
    """Reads one framed reply: (is_error, payload)."""
    header = b""
    while len(header) < 4:
        header += sock.recv(4 - len(header))
    raw = struct.unpack(">I", header)[0]
    length, is_error = raw & 0x7FFFFFFF, bool(raw & 0x80000000)
    payload = b""
    while len(payload) < length:
        payload += sock.recv(length - len(payload))
    return is_error, payload


def goodbye_then_close(sock: socket.socket) -> str:
    """Reads a framed connection the server closes by choice to its end: exactly one error
    reply of kind "closing" (nothing without a reply was handled), then the close. Returns its
    message."""
    said = b""
    while chunk := sock.recv(4096):
        said += chunk
    (raw,) = struct.unpack(">I", said[:4])
    assert raw & 0x8000_0000 and len(said) == 4 + (raw & 0x7FFF_FFFF), said
    goodbye = json.loads(said[4:])
    assert goodbye["error"] == "closing", goodbye
    return goodbye["message"]


def refuses(address) -> bool:
    """Whether nothing listens at ``address`` any more."""
    try:
        socket.create_connection(address[:2], timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # The listener closed while this connection waited in its backlog: it is going away,
        # and the next look tells.
        return False
    return False
