"""Clients with several addresses: a request no server saw goes to the next one, a request whose
connection broke goes again only when marked idempotent, retries back off, and the counts say
what happened. For ``framesock.Client`` and ``framesock.aio.Client`` alike."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading

import pytest

import framesock
from framesock import aio


def free_port() -> int:
    """A port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def named(start_server, name: str, **kwargs) -> framesock.Server:
    return start_server(lambda request: {"server": name, "request": request}, protocol="framed", **kwargs)


class Blocking:
    """The blocking client through the same calls as the aio one."""

    def __init__(self, **kwargs) -> None:
        self.client = framesock.Client(protocol="framed", timeout=10, **kwargs)

    def request(self, message, **kwargs):
        return self.client.request(message, **kwargs)

    def stats(self):
        return self.client.stats()

    def close(self):
        self.client.close()


class Async:
    """aio.Client driven from this thread, one event loop per object."""

    def __init__(self, **kwargs) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = aio.Client(protocol="framed", timeout=10, **kwargs)

    def request(self, message, **kwargs):
        return self.loop.run_until_complete(self.client.request(message, **kwargs))

    def stats(self):
        return self.client.stats()

    def close(self):
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(params=[Blocking, Async], ids=["Client", "aio.Client"])
def client(request):
    made = []

    def make(**kwargs):
        made.append(request.param(**kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_refused_address_is_skipped_whatever_the_start(start_server, client):
    live = named(start_server, "live")
    for _ in range(10):  # the start is random: either order comes up
        each = client(addresses=[("127.0.0.1", free_port()), ("127.0.0.1", live.port)])
        assert each.request("hi") == {"server": "live", "request": "hi"}
        assert each.stats()["retries"] == 0


def test_every_address_refused_retries_then_says_the_request_was_never_sent(client, caplog):
    caplog.set_level(logging.DEBUG, logger="framesock.client")
    each = client(addresses=[("127.0.0.1", free_port()), ("127.0.0.1", free_port())], retries=2)
    with pytest.raises(ConnectionRefusedError) as raised:
        each.request("hi")
    assert raised.value.request_sent is False
    assert each.stats()["retries"] == 2
    assert each.stats()["failovers"] >= 5
    assert any("try 3 of 3" in record.getMessage() for record in caplog.records)


class Breaking:
    """A backend that dies with every request in hand: reads it, then resets the connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                except OSError:
                    pass
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def breaking():
    made = []

    def make() -> Breaking:
        made.append(Breaking())
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def test_a_broken_request_is_repeated_only_when_idempotent(breaking, start_server, client):
    live = named(start_server, "live")
    broken = breaking()
    # Alone on the broken backend: the request reached it, so it is not sent again.
    alone = client(addresses=[("127.0.0.1", broken.port)], retries=3)
    with pytest.raises(OSError) as raised:
        alone.request("not idempotent")
    assert getattr(raw := raised.value, "request_sent", True) is True, raw
    assert alone.stats()["retries"] == 0
    # Marked idempotent, with a live backend beside it: it goes there, whatever the start.
    for _ in range(6):
        each = client(addresses=[("127.0.0.1", broken.port), ("127.0.0.1", live.port)], retries=1)
        assert each.request("safe", idempotent=True)["server"] == "live"


def test_idempotent_as_the_clients_setting(breaking, start_server, client):
    live = named(start_server, "live")
    broken = breaking()
    for _ in range(6):
        each = client(addresses=[("127.0.0.1", broken.port), ("127.0.0.1", live.port)], retries=2, idempotent=True)
        assert each.request("x")["server"] == "live"
    alone = client(addresses=[("127.0.0.1", broken.port)], retries=2, idempotent=True)
    with pytest.raises(OSError):
        alone.request("x")
    assert alone.stats()["retries"] == 2


def test_many_clients_spread_over_the_addresses(start_server):
    first, second = named(start_server, "first"), named(start_server, "second")
    seen = set()
    clients = [framesock.Client(addresses=[("127.0.0.1", first.port), ("127.0.0.1", second.port)], protocol="framed") for _ in range(40)]
    try:
        for each in clients:
            seen.add(each.request("x")["server"])
    finally:
        for each in clients:
            each.close()
    assert seen == {"first", "second"}


def test_a_stopped_backend_loses_no_request(start_server, client):
    """A server that shuts down says goodbye: what it did not handle goes again, and since it
    no longer accepts, to the next address."""
    servers = {"a": named(start_server, "a"), "b": named(start_server, "b")}
    each = client(addresses=[("127.0.0.1", servers["a"].port), ("127.0.0.1", servers["b"].port)])
    went_to = each.request("first")["server"]
    servers[went_to].shutdown(timeout=5)
    other = "b" if went_to == "a" else "a"
    for index in range(5):
        assert each.request(index)["server"] == other


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="addresses is empty"):
        framesock.Client(addresses=[])
    with pytest.raises(ValueError, match="addresses is empty"):
        aio.Client(addresses=[])
    with pytest.raises((TypeError, ValueError)):
        framesock.Client(retries=-1)
    with pytest.raises(ValueError):
        aio.Client(retries=-1)
    client = framesock.Client(addresses=[("127.0.0.1", 1), ("::1", 2)])
    assert client.addresses == [("127.0.0.1", 1), ("::1", 2)]
