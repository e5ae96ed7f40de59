"""The closing handshake: a server closes a framed connection only after saying so.

Whenever a framed server closes a connection by its own choice (to make room, at its idle
timeout, at shutdown) it first writes an error reply of kind "closing", then handles nothing
more from that connection. framesock's clients send again, on a new connection, every request
that had no reply before the goodbye: no request is lost, none is handled twice. framesock 0.1
closed the connection under a request that was arriving (450 of 1,220 requests failed with
ConnectionResetError in the eviction race below).
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import pytest
from conftest import PeerThread, frame, goodbye_then_close, read_reply_frame, wait_until

import framesock
from framesock import aio

ROUNDS = 600


def counting_echo():
    """An echo handler and the list of every request it handled."""
    handled: list[str] = []
    lock = threading.Lock()

    def handler(request):
        with lock:
            handled.append(request)
        return request

    return handler, handled


@pytest.mark.timeout(120)
def test_eviction_racing_requests_loses_none_and_handles_none_twice(start_server):
    # Two kept clients pause between requests (so they are idle, and evictable), while a third
    # party opens new connections all the time, each of which evicts the longest-idle one.
    handler, handled = counting_echo()
    server = start_server(handler, protocol="framed", max_connections=2)
    address = server.address[:2]
    stop = threading.Event()
    failures: list[BaseException] = []

    def kept_client(name: str) -> int:
        sent = 0
        rng = random.Random(name)
        with framesock.Client(*address, protocol="framed") as client:
            while sent < ROUNDS and not stop.is_set():
                try:
                    if sent % 5 == 4:
                        batch = [f"{name}-{sent}-{i}" for i in range(3)]
                        assert client.request_many(batch) == batch
                    else:
                        assert client.request(f"{name}-{sent}") == f"{name}-{sent}"
                except BaseException as err:  # noqa: BLE001 - counted, the test fails below
                    failures.append(err)
                sent += 1
                time.sleep(rng.random() * 0.002)
        return sent

    def evictor() -> int:
        opened = 0
        while not stop.is_set() and opened < 5 * ROUNDS:
            with framesock.Client(*address, protocol="framed") as client:
                try:
                    assert client.request(f"new-{opened}") == f"new-{opened}"
                except BaseException as err:  # noqa: BLE001
                    failures.append(err)
            opened += 1
        return opened

    peers = [PeerThread(lambda n=n: kept_client(n)) for n in ("a", "b")] + [PeerThread(evictor)]
    for peer in peers:
        peer.start()
    try:
        for peer in peers[:2]:
            assert peer.outcome(timeout=100) == ROUNDS
    finally:
        stop.set()
    peers[2].outcome(timeout=30)
    assert not failures, f"{len(failures)} requests failed, first: {failures[0]!r}"
    assert server.stats()["idle_evicted"] > 0  # the race was run
    assert len(handled) == len(set(handled))  # none handled twice


@pytest.mark.timeout(120)
async def test_aio_clients_resend_what_the_goodbye_left_unhandled():
    handler, handled = counting_echo()
    async with aio.Server(handler, port=0, protocol="framed", max_connections=2) as server:
        address = server.address[:2]

        async def kept_client(name: str) -> None:
            async with aio.Client(*address, protocol="framed") as client:
                for round_ in range(ROUNDS // 3):
                    requests = [f"{name}-{round_}-{i}" for i in range(4)]
                    assert await asyncio.gather(*(client.request(r) for r in requests)) == requests
                    await asyncio.sleep(random.random() * 0.002)

        async def evictor(done: asyncio.Event) -> int:
            opened = 0
            while not done.is_set():
                async with aio.Client(*address, protocol="framed") as client:
                    assert await client.request(f"new-{opened}") == f"new-{opened}"
                opened += 1
            return opened

        done = asyncio.Event()
        evicting = asyncio.ensure_future(evictor(done))
        try:
            await asyncio.gather(kept_client("a"), kept_client("b"))
        finally:
            done.set()
        await evicting
        assert server.stats()["idle_evicted"] > 0
    assert len(handled) == len(set(handled))


def test_a_request_that_meets_the_goodbye_is_not_handled(start_server):
    handler, handled = counting_echo()
    server = start_server(handler, protocol="framed", idle_timeout=0.2)
    with socket.create_connection(server.address[:2], timeout=10) as sock:
        sock.sendall(frame(b'"before"'))
        assert read_reply_frame(sock) == (False, b'"\\"before\\""')
        wait_until(lambda: server.stats()["idle_closed"] == 1)  # the goodbye is on its way
        sock.sendall(frame(b'"after"'))  # read and dropped by the lingering server
        message = goodbye_then_close(sock)
    assert "was not handled" in message
    assert handled == ['"before"']


def test_a_blocking_client_idle_past_the_goodbye_goes_on_without_an_error(start_server):
    handler, handled = counting_echo()
    server = start_server(handler, protocol="framed", idle_timeout=0.1)
    with framesock.Client(*server.address[:2], protocol="framed") as client:
        assert client.request("one") == "one"
        wait_until(lambda: server.stats()["idle_closed"] == 1)
        assert client.request("two") == "two"
        wait_until(lambda: server.stats()["idle_closed"] == 2)
        assert client.request_many(["x", "y"]) == ["x", "y"]
    assert handled == ["one", "two", "x", "y"]
