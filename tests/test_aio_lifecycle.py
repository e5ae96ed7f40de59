"""framesock.aio objects live and die with their event loop, and release what they open.

These tests run their own ``asyncio.run()`` so that the loop's end is part of the test.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import framesock
from conftest import PeerThread, open_files, refuses, wait_until
from framesock import aio


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


def test_a_server_stops_when_its_loop_ends_without_shutdown():
    state: dict = {}

    async def handler(request):
        state["entered"].set()
        await asyncio.Event().wait()  # never returns on its own

    async def main():
        state["entered"] = asyncio.Event()
        server = aio.Server(handler, port=0)
        await server.start()
        state["address"] = server.address
        client = PeerThread(lambda: framesock.start_client(*server.address[:2], timeout=10))
        client.start()
        state["client"] = client
        await state["entered"].wait()
        # Returning ends the loop with the server running and a handler waiting.

    asyncio.run(main())
    with pytest.raises(ConnectionError):
        state["client"].outcome()  # told at once, not left waiting for the timeout
    wait_until(lambda: refuses(state["address"]))


def test_a_client_closes_its_connection_when_its_loop_ends():
    with framesock.Server(response=1, port=0, protocol="framed") as server:

        async def main():
            client = aio.Client(*server.address[:2], protocol="framed")
            assert await client.request("x") == 1
            return client  # kept alive past the loop, never closed

        client = asyncio.run(main())
        wait_until(lambda: server.stats()["connections_active"] == 0)
        del client


def test_a_dropped_client_closes_its_connection():
    with framesock.Server(response=1, port=0, protocol="framed") as server:

        async def main():
            client = aio.Client(*server.address[:2], protocol="framed")
            assert await client.request("x") == 1
            assert server.stats()["connections_active"] == 1
            del client
            await asyncio.sleep(0)
            while server.stats()["connections_active"]:
                await asyncio.sleep(0.01)

        asyncio.run(asyncio.wait_for(main(), 10))


def test_start_client_leaves_no_file_descriptor_open():
    with framesock.Server(response=1, port=0) as server:
        host, port = server.address[:2]

        async def main():
            for _ in range(200):
                assert await aio.start_client(host, port) == 1

        before = open_files()
        asyncio.run(main())
        # The server closes its side of each exchange just after the client has its reply.
        wait_until(lambda: not open_files() - before)
