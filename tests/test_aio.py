"""framesock.aio: the same behaviour for asyncio programs, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import sys
import logging
import socket
import time

import pytest

import framesock
from framesock import aio
from conftest import frame, raw_exchange


async def until(condition, limit: float = 10.0) -> None:
    """Waits, on the loop, until ``condition()`` holds; fails the test after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def send_and_leave(port: int, data: bytes) -> None:
    """A hostile peer: sends `data` and closes at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)


async def echo(request):
    await asyncio.sleep(0)
    return {"echo": request}


@pytest.fixture
async def serve():
    """Factory: ``await serve(handler, **kwargs)`` starts an aio.Server on port 0."""
    started: list[aio.Server] = []

    async def start(handler=echo, **kwargs):
        kwargs.setdefault("port", 0)
        server = aio.Server(handler, **kwargs)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.shutdown(timeout=2.0)


async def test_start_server_and_start_client():
    loop = asyncio.get_running_loop()
    listening = loop.create_future()
    serving = asyncio.create_task(aio.start_server(port=0, handler=echo, ready=listening.set_result))
    address = await asyncio.wait_for(listening, 10)
    assert await aio.start_client(*address[:2], message="hi") == {"echo": "hi"}
    exchange = await serving
    assert exchange["request"] == "hi" and exchange["reply"] == {"echo": "hi"}


async def test_start_server_defaults_match_the_seed():
    loop = asyncio.get_running_loop()
    listening = loop.create_future()
    serving = asyncio.create_task(aio.start_server(port=0, ready=listening.set_result))
    address = await listening
    reply = await asyncio.to_thread(raw_exchange, address[1], frame(b"msg from client"))
    assert reply == b'{"key": "id", "val": 123}'
    assert (await serving)["request_bytes"] == b"msg from client"


async def test_start_server_errors_are_raised():
    loop = asyncio.get_running_loop()
    listening = loop.create_future()
    serving = asyncio.create_task(aio.start_server(port=0, ready=listening.set_result))
    address = await listening
    await asyncio.to_thread(send_and_leave, address[1], b"\xff\xff\xff\xff")
    with pytest.raises(framesock.FrameTooLargeError):
        await asyncio.wait_for(serving, 10)


@pytest.mark.parametrize("protocol", ["classic", "framed"])
async def test_round_trips(serve, protocol):
    server = await serve(protocol=protocol)
    async with aio.Client(*server.address, protocol=protocol) as client:
        assert await client.request("hi") == {"echo": "hi"}
        assert await client.request_many(["a", "b"]) == [{"echo": "a"}, {"echo": "b"}]
        assert await client.request_many([]) == []


async def test_plain_function_handler_and_static_response(serve):
    server = await serve(lambda request: request.upper(), protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("abc") == "ABC"
    server = await serve(None, response={"fixed": 1})
    assert await aio.start_client(*server.address) == {"fixed": 1}


async def test_blocking_and_async_sides_interoperate(serve):
    server = await serve(protocol="framed")
    reply = await asyncio.to_thread(
        lambda: framesock.Client(*server.address, protocol="framed").request("from a thread")
    )
    assert reply == {"echo": "from a thread"}
    with framesock.Server(lambda r: r, port=0, protocol="framed") as blocking:
        async with aio.Client(*blocking.address, protocol="framed") as client:
            assert await client.request("x") == "x"


async def test_a_thousand_concurrent_requests_on_one_loop(serve):
    async def slow_echo(request):
        await asyncio.sleep(0.01)
        return {"echo": request}

    server = await serve(slow_echo, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        replies = await asyncio.gather(*(client.request(f"m{i}") for i in range(1000)))
    assert replies == [{"echo": f"m{i}"} for i in range(1000)]
    assert server.stats()["requests"] == 1000


async def test_handler_runs_concurrently_on_the_loop(serve):
    both_started = asyncio.Event()
    started = []

    async def handler(request):
        started.append(request)
        if len(started) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 5)  # deadlocks unless both run at once
        return request

    server = await serve(handler, protocol="framed")
    a = aio.Client(*server.address, protocol="framed")
    b = aio.Client(*server.address, protocol="framed")
    assert await asyncio.gather(a.request("a"), b.request("b")) == ["a", "b"]


async def test_handler_error_then_success(serve, caplog):
    async def handler(request):
        if request == "boom":
            raise ValueError("async boom")
        return request

    server = await serve(handler, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            with pytest.raises(framesock.RemoteError, match="async boom"):
                await client.request("boom")
        assert await client.request("fine") == "fine"
    assert server.stats()["errors"]["handler"] == 1


async def test_loop_is_not_blocked_while_waiting(serve):
    async def slow(request):
        await asyncio.sleep(0.3)
        return request

    server = await serve(slow, protocol="framed")
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("x") == "x"
    ticking.cancel()
    assert ticks >= 10


async def test_cancelling_a_request_leaves_the_client_usable(serve):
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(request):
        if request == "stuck":
            started.set()
            await release.wait()
        return request

    server = await serve(handler, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        task = asyncio.create_task(client.request("stuck"))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await client.request("next") == "next"  # the stale reply was read and dropped


async def test_wait_for_times_out_and_client_recovers(serve):
    async def handler(request):
        if request == "slow":
            await asyncio.sleep(1)
        return request

    server = await serve(handler, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.request("slow"), 0.1)
        assert time.monotonic() - started < 0.9
        assert await client.request("quick") == "quick"


async def test_client_timeout_raises_timeout_error(serve):
    async def handler(request):
        await asyncio.sleep(2)
        return request

    server = await serve(handler, protocol="framed")
    async with aio.Client(*server.address, protocol="framed", timeout=0.2) as client:
        with pytest.raises(framesock.FramesockTimeoutError):
            await client.request("x")


async def test_cancelling_serve_forever_shuts_down():
    server = aio.Server(echo, port=0, protocol="framed")
    task = asyncio.create_task(server.serve_forever())
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("up") == {"echo": "up"}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    with pytest.raises(ConnectionRefusedError):
        await aio.start_client(*server.address)


async def test_serve_forever_returns_after_shutdown():
    server = aio.Server(echo, port=0)
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0.05)
    await server.shutdown()
    await asyncio.wait_for(task, 5)


async def test_shutdown_under_load(serve):
    async def handler(request):
        await asyncio.sleep(0.005)
        return request

    server = await serve(handler, protocol="framed")
    clients = [aio.Client(*server.address, protocol="framed") for _ in range(20)]

    done = [0] * len(clients)

    async def hammer(index, client):
        try:
            while True:
                await client.request("x")
                done[index] += 1
        except (ConnectionError, framesock.FramesockError, OSError):
            return done[index]

    tasks = [asyncio.create_task(hammer(index, client)) for index, client in enumerate(clients)]
    await until(lambda: all(count > 0 for count in done))
    await asyncio.wait_for(server.shutdown(timeout=2.0), 5)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert all(done > 0 for done in results)


async def test_hostile_peer_costs_only_its_connection(serve, caplog):
    server = await serve(protocol="framed")
    with caplog.at_level(logging.CRITICAL, logger="framesock"):
        await asyncio.to_thread(send_and_leave, server.address[1], b"\x00\x00\x00\x10half")
        await until(lambda: server.stats()["errors"]["disconnected"] == 1)
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("ok") == {"echo": "ok"}
    assert server.stats()["errors"]["disconnected"] == 1


async def test_unix_socket(serve, tmp_path):
    path = str(tmp_path / "aio.sock")
    await serve(path=path, protocol="framed")
    async with aio.Client(path=path, protocol="framed") as client:
        assert await client.request("u") == {"echo": "u"}


async def test_closed_client_refuses():
    client = aio.Client(port=9, protocol="framed")
    await client.close()
    with pytest.raises(ValueError, match="closed"):
        await client.request("x")


async def test_bad_arguments():
    with pytest.raises(ValueError):
        aio.Client(port=70000)
    with pytest.raises(ValueError):
        aio.Server(echo, port=0, protocol="udp")
    with pytest.raises(TypeError):
        await aio.start_client(port=9, message={1, 2})


def test_works_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with aio.Server(echo, port=0, protocol="framed") as server:
            async with aio.Client(*server.address, protocol="framed") as client:
                replies = await asyncio.gather(*(client.request(str(i)) for i in range(100)))
                assert replies == [{"echo": str(i)} for i in range(100)]
                task = asyncio.create_task(client.request("x"))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await client.request("y") == {"echo": "y"}

    uvloop.run(main())


async def test_coroutine_handlers_run_as_tasks(serve):
    # Each handler runs in a Task of its own, on this loop: asyncio.timeout() (3.11+) works, and
    # context variables set by one request do not leak into the next.
    import contextvars

    seen = contextvars.ContextVar("seen", default=None)
    loop = asyncio.get_running_loop()

    async def handler(request):
        assert asyncio.get_running_loop() is loop
        assert asyncio.current_task() is not None
        leaked = seen.get()
        seen.set(request)
        if sys.version_info >= (3, 11):
            async with asyncio.timeout(1):  # raises RuntimeError outside a Task
                await asyncio.sleep(0)
        return {"leaked": leaked}

    server = await serve(handler, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("one") == {"leaked": None}
        assert await client.request("two") == {"leaked": None}


async def test_client_reconnects_after_the_server_drops_it(serve):
    # The server closes the client's idle connection; the next request opens a new one (the
    # client either saw the close first or has its request told to go elsewhere).
    server = await serve(protocol="framed", idle_timeout=0.1)
    async with aio.Client(*server.address, protocol="framed") as client:
        assert await client.request("one") == {"echo": "one"}
        await until(lambda: server.stats()["idle_closed"] == 1)
        assert await client.request("two") == {"echo": "two"}
    assert server.stats()["connections_accepted"] == 2


async def test_requests_in_flight_fail_when_the_connection_breaks(serve, caplog):
    async def handler(request):
        await asyncio.sleep(0.5)
        return request

    server = await serve(handler, protocol="framed", idle_timeout=5)
    async with aio.Client(*server.address, protocol="framed") as client:
        waiting = asyncio.create_task(client.request("x"))
        await until(lambda: server.stats()["requests_in_progress"] == 1)
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            await server.shutdown(timeout=0.05)  # drops the exchange in progress
        with pytest.raises((ConnectionError, framesock.FramesockError)):
            await asyncio.wait_for(waiting, 5)


async def test_close_fails_waiting_requests(serve):
    release = asyncio.Event()

    async def handler(request):
        await release.wait()
        return request

    server = await serve(handler, protocol="framed")
    client = aio.Client(*server.address, protocol="framed")
    waiting = asyncio.create_task(client.request("x"))
    await until(lambda: server.stats()["requests_in_progress"] == 1)
    await client.close()
    with pytest.raises(ConnectionAbortedError):
        await asyncio.wait_for(waiting, 5)
    release.set()


async def test_large_messages_written_in_the_background(serve):
    server = await serve(protocol="framed")
    big = "y" * 3_000_000  # more than the socket takes in one write
    async with aio.Client(*server.address, protocol="framed") as client:
        replies = await asyncio.gather(*(client.request(big) for _ in range(3)), client.request("small"))
    assert replies[:3] == [{"echo": big}] * 3 and replies[3] == {"echo": "small"}


def read_request_frame(conn: socket.socket) -> bytes:
    header = conn.recv(4, socket.MSG_WAITALL)
    return conn.recv(int.from_bytes(header, "big"), socket.MSG_WAITALL)


@pytest.mark.parametrize(
    ("protocol", "reply", "error"),
    [
        ("classic", b'{"broken": ', framesock.JSONDecodeError),
        ("classic", b"", framesock.ConnectionClosedError),
        ("framed", b"\x00\x00\x00\x04[1, ", framesock.JSONDecodeError),
        ("framed", b"\x7f\xff\xff\xff", framesock.FrameTooLargeError),
        ("framed", b"\x00\x00\x00\x10half", framesock.ConnectionClosedError),
    ],
    ids=["classic-broken-json", "classic-no-reply", "framed-broken-json", "framed-too-large", "framed-half"],
)
async def test_hostile_servers_give_the_documented_errors(raw_server, protocol, reply, error):
    def behave(conn):
        read_request_frame(conn)
        conn.sendall(reply)

    server = raw_server(behave)
    async with aio.Client("127.0.0.1", server.port, protocol=protocol, max_reply=1 << 20) as client:
        with pytest.raises(error):
            await asyncio.wait_for(client.request("x"), 10)


async def test_error_reply_and_connection_refused(serve, caplog):
    server = await serve(lambda request: 1 / 0, protocol="framed")
    async with aio.Client(*server.address, protocol="framed") as client:
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            with pytest.raises(framesock.RemoteError) as caught:
                await client.request("x")
    assert caught.value.kind == "handler"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            await aio.Client("127.0.0.1", port, protocol="framed").request("x")
        with pytest.raises(ConnectionRefusedError):
            await aio.start_client("127.0.0.1", port)


async def test_ipv6(serve):
    try:
        server = await serve(host="::1", protocol="framed")
    except OSError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    async with aio.Client("::1", server.address[1], protocol="framed") as client:
        assert await client.request("six") == {"echo": "six"}


async def test_shutdown_cancels_coroutine_handlers_it_drops(serve, caplog):
    cancelled = asyncio.Event()

    async def handler(request):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return request

    server = await serve(handler, protocol="framed")
    client = aio.Client(*server.address, protocol="framed")
    waiting = asyncio.create_task(client.request("x"))
    await until(lambda: server.stats()["requests_in_progress"] == 1)
    with caplog.at_level(logging.CRITICAL, logger="framesock"):
        await server.shutdown(timeout=0.1)
    await asyncio.wait_for(cancelled.wait(), 5)
    with pytest.raises((ConnectionError, framesock.FramesockError)):
        await asyncio.wait_for(waiting, 5)
    await client.close()
