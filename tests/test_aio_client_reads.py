"""aio.Client reads its replies on its event loop's own thread (plain TCP and Unix sockets):
replies large and dribbled, servers that cut a reply, clients that come and go on one loop
(each socket is closed once the loop stops watching it), a client that moves to another loop,
timeouts; on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

import framesock
from framesock import aio
from conftest import frame, open_files

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main) -> None:
    """Runs the coroutine function ``main`` on a new loop of the kind ``loop``."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(main())
    else:
        asyncio.run(main())


def read_request(conn: socket.socket) -> bytes:
    header = conn.recv(4, socket.MSG_WAITALL)
    return conn.recv(int.from_bytes(header, "big"), socket.MSG_WAITALL)


def reply_frame(value: str) -> bytes:
    return frame(('"' + value + '"').encode())


async def until(condition, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def answer(request: str):
    if request.startswith("big"):
        return {"big": request * 300_000}  # about 1 MiB: many reads
    if request == "slow":
        time.sleep(2)
    return {"echo": request}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_large_replies_arrive_whole_and_in_order_among_small_ones(loop, family, tmp_path):
    async def main():
        where = {"path": tmp_path / "s.sock"} if family == "unix" else {"port": 0}
        async with aio.Server(answer, protocol="framed", **where) as server:
            target = {"path": where["path"]} if family == "unix" else {"host": "127.0.0.1", "port": server.port}
            async with aio.Client(protocol="framed", **target) as client:
                messages = [f"big{i}" if i % 3 == 0 else f"small{i}" for i in range(24)]
                replies = await asyncio.gather(*(client.request(m) for m in messages))
                assert replies == [answer(m) for m in messages]

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_thousands_of_replies_in_bursts_are_all_handed_out(loop):
    # More bytes arrive together than one callback reads: what it read last is handed out too.
    async def main():
        async with aio.Server(answer, protocol="framed", port=0) as server:
            async with aio.Client("127.0.0.1", server.port, protocol="framed") as client:
                messages = [f"m{i:05d}" + "x" * 200 for i in range(5000)]
                many, *each = await asyncio.wait_for(
                    asyncio.gather(client.request_many(messages), *(client.request(m) for m in messages[:300])), 60
                )
                assert many == [{"echo": m} for m in messages]
                assert each == [{"echo": m} for m in messages[:300]]

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_dribbled_byte_by_byte(loop, raw_server):
    def dribble(conn):
        for value in ("first", "second"):
            read_request(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in reply_frame(value):
                conn.sendall(bytes([byte]))
                time.sleep(0.001)  # the peer's pace: each byte its own segment

    server = raw_server(dribble)

    async def main():
        async with aio.Client("127.0.0.1", server.port, protocol="framed") as client:
            assert await asyncio.wait_for(client.request("a"), 10) == "first"
            assert await asyncio.wait_for(client.request("b"), 10) == "second"

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"\x00\x00\x00\x10half", framesock.ConnectionClosedError),
        (b"\x00\x00", framesock.ConnectionClosedError),
        (b"", framesock.ConnectionClosedError),
        (b"\x7f\xff\xff\xff", framesock.FrameTooLargeError),
        (b'{"not": "framed"}', framesock.ProtocolError),
    ],
    ids=["cut-payload", "cut-header", "closed", "too-large", "classic-reply"],
)
def test_a_server_that_cuts_or_garbles_the_reply(loop, reply, error, raw_server):
    def behave(conn):
        read_request(conn)
        conn.sendall(reply)

    server = raw_server(behave)

    async def main():
        async with aio.Client("127.0.0.1", server.port, protocol="framed", max_reply=1 << 20) as client:
            with pytest.raises(error):
                await asyncio.wait_for(client.request("x"), 10)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_clients_that_come_and_go_on_one_loop_leave_no_socket_behind(loop):
    async def main():
        async with aio.Server(answer, protocol="framed", port=0) as server:
            before = open_files()
            for round_ in range(60):
                client = aio.Client("127.0.0.1", server.port, protocol="framed")
                replies = await asyncio.gather(*(client.request(f"{round_}-{i}") for i in range(3)))
                assert replies == [{"echo": f"{round_}-{i}"} for i in range(3)]
                if round_ % 3 == 0:
                    # Closed with a request in flight: it is answered or fails as a connection error.
                    pending = asyncio.ensure_future(client.request("late"))
                    await asyncio.sleep(0)
                    await client.close()
                    try:
                        assert await asyncio.wait_for(pending, 10) == {"echo": "late"}
                    except (ConnectionError, ValueError):
                        pass
                elif round_ % 3 == 1:
                    await client.close()
                else:
                    del client  # dropped without close()
            # Every client's socket closes once its loop has stopped watching it.
            await until(lambda: not open_files() - before)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_moves_to_another_loop(loop):
    with framesock.Server(answer, port=0, protocol="framed") as server:
        threads = threading.Thread(target=server.serve_forever, daemon=True)
        threads.start()
        client = aio.Client("127.0.0.1", server.port, protocol="framed")

        async def use(tag: str):
            assert await asyncio.wait_for(client.request(tag), 10) == {"echo": tag}

        run(loop, lambda: use("first loop"))
        run(loop, lambda: use("second loop"))
        asyncio.run(client.close())
        server.shutdown()
        threads.join(10)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_late_reply_times_out_and_the_client_goes_on(loop):
    async def main():
        async with aio.Server(answer, protocol="framed", port=0) as server:
            async with aio.Client("127.0.0.1", server.port, protocol="framed", timeout=0.3) as client:
                with pytest.raises(framesock.FramesockTimeoutError):
                    await client.request("slow")
                assert await client.request("after") == {"echo": "after"}

    run(loop, main)
