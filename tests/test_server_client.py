"""Server and Client: many clients, both protocols, failures isolated, shutdown, limits."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import framesock
from conftest import PeerThread, frame, goodbye_then_close, raw_exchange, read_reply_frame, wait_until


def echo(request):
    return {"echo": request}


@pytest.fixture
def serve(start_server):
    """Factory: ``serve(handler=echo, **kwargs)``: ``start_server`` with the echo handler."""

    def start(handler=echo, **kwargs):
        return start_server(handler, **kwargs)

    return start


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_request_round_trip(serve, protocol):
    server = serve(protocol=protocol)
    with framesock.Client(*server.address, protocol=protocol) as client:
        assert client.request("hi") == {"echo": "hi"}
        assert client.request({"a": 1}) == {"echo": '{"a": 1}'}
        assert client.request_many(["x", "y"]) == [{"echo": "x"}, {"echo": "y"}]


def test_classic_server_speaks_the_seeds_wire(serve):
    server = serve(None)
    assert raw_exchange(server.address[1], frame(b"x")) == b'{"key": "id", "val": 123}'
    assert framesock.start_client(*server.address) == {"key": "id", "val": 123}


def test_static_response_and_json_requests(serve):
    server = serve(None, response=[1, 2, 3], protocol="framed")
    with framesock.Client(*server.address, protocol="framed") as client:
        assert client.request("anything") == [1, 2, 3]
    server = serve(lambda req: req["n"] * 2, protocol="framed", request_as="json")
    with framesock.Client(*server.address, protocol="framed") as client:
        assert client.request({"n": 21}) == 42


def test_framed_wire_by_hand(serve):
    server = serve(protocol="framed")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(frame(b"a") + frame(b"b"))
        assert read_reply_frame(sock) == (False, b'{"echo": "a"}')
        assert read_reply_frame(sock) == (False, b'{"echo": "b"}')


NOT_UTF8 = [
    b"\xff",  # never in UTF-8
    b"a\xc3",  # a sequence cut short at the end
    b"\xc3(",  # a lead byte without its continuation
    b"\xc0\x80",  # an overlong NUL
    b"\xed\xa0\x80",  # a surrogate, encoded
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf0\x9f\x98",  # four bytes cut to three
    b"\xe2\x82\xac\x80\xe2",  # a good one, a stray continuation, a cut one
    "naïve €".encode() + b"\xfe",
]


def test_request_text_is_what_python_decodes_with_replace(serve):
    # Where bytes are not UTF-8, the handler's text is exactly
    # payload.decode("utf-8", "replace"): the same characters and the same number of U+FFFD.
    server = serve(lambda text: {"text": text}, protocol="framed")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"".join(frame(payload) for payload in NOT_UTF8))
        for payload in NOT_UTF8:
            is_error, reply = read_reply_frame(sock)
            assert not is_error
            assert json.loads(reply) == {"text": payload.decode("utf-8", "replace")}, payload


def test_two_hundred_clients_at_once(serve):
    server = serve(lambda req: {"echo": req, "thread": threading.get_ident()}, protocol="framed")
    errors: list[BaseException] = []

    def client_work(n: int) -> None:
        try:
            with framesock.Client(*server.address, protocol="framed", timeout=30) as client:
                for i in range(5):
                    message = f"client {n} message {i}"
                    assert client.request(message)["echo"] == message
                replies = client.request_many([f"{n}/{i}" for i in range(20)])
                assert [r["echo"] for r in replies] == [f"{n}/{i}" for i in range(20)]
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client_work, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    stats = server.stats()
    assert stats["requests"] == 200 * 25
    assert stats["connections_accepted"] == 200


def test_classic_clients_at_once(serve):
    server = serve(protocol="classic")
    results = []
    threads = [
        PeerThread(lambda n=n: framesock.start_client(*server.address, message=str(n))) for n in range(100)
    ]
    for thread in threads:
        thread.start()
    for n, thread in enumerate(threads):
        results.append(thread.outcome(30))
    assert results == [{"echo": str(n)} for n in range(100)]


def test_handler_that_raises_costs_one_exchange(serve, caplog):
    def handler(request):
        if request == "boom":
            raise ValueError("boom requested")
        return request

    server = serve(handler, protocol="framed")
    with framesock.Client(*server.address, protocol="framed") as client:
        with caplog.at_level(logging.ERROR, logger="framesock"):
            with pytest.raises(framesock.RemoteError, match="boom requested") as caught:
                client.request("boom")
        assert caught.value.kind == "handler"
        assert client.request("fine") == "fine"  # same connection, still in step
    assert server.stats()["errors"]["handler"] == 1
    # Records are written by a handler thread, after the error reply went out.
    wait_until(lambda: any("boom requested" in record.getMessage() for record in caplog.records))


def test_handler_error_in_classic_closes_without_reply(serve, caplog):
    server = serve(lambda request: 1 / 0)
    with caplog.at_level(logging.CRITICAL, logger="framesock"):
        with pytest.raises(framesock.ConnectionClosedError):
            framesock.start_client(*server.address)
    server_ok = serve(echo)
    assert framesock.start_client(*server_ok.address, message="ok") == {"echo": "ok"}


def test_unserialisable_reply_is_an_error_reply(serve, caplog):
    server = serve(lambda request: {"bad": {1, 2}} if request == "bad" else request, protocol="framed")
    with framesock.Client(*server.address, protocol="framed") as client:
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            with pytest.raises(framesock.RemoteError) as caught:
                client.request("bad")
        assert caught.value.kind == "encode"
        assert client.request("good") == "good"
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            with pytest.raises(framesock.RemoteError, match=r"encode.*\n?.*"):
                client.request_many(["good", "bad", "good"])
        assert client.request("again") == "again"


def test_oversized_frame_gets_an_error_reply_then_close(serve, caplog):
    server = serve(protocol="framed", max_frame=100)
    with caplog.at_level(logging.CRITICAL, logger="framesock"):
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"\xff\xff\xff\xff")
            is_error, payload = read_reply_frame(sock)
            assert is_error and json.loads(payload)["error"] == "frame_too_large"
            assert sock.recv(10) == b""
        with framesock.Client(*server.address, protocol="framed") as client:
            assert client.request("still serving") == {"echo": "still serving"}
    assert server.stats()["errors"]["frame_too_large"] == 1


def test_stalled_and_vanishing_clients_cost_only_their_connection(serve, caplog):
    server = serve(protocol="framed", timeout=0.3)
    with caplog.at_level(logging.CRITICAL, logger="framesock"):
        stalled = socket.create_connection(server.address, timeout=10)
        stalled.sendall(frame(b"0123456789")[:6])
        vanished = socket.create_connection(server.address, timeout=10)
        vanished.sendall(frame(b"0123456789")[:6])
        vanished.close()
        with framesock.Client(*server.address, protocol="framed") as client:
            assert client.request("ok") == {"echo": "ok"}
        assert stalled.recv(10) == b""  # dropped after the timeout
        stalled.close()
    errors = server.stats()["errors"]
    assert errors["timeout"] == 1 and errors["disconnected"] == 1


def test_idle_timeout_closes_silent_connections(serve):
    server = serve(protocol="framed", idle_timeout=0.2)
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(frame(b"a"))
        assert read_reply_frame(sock) == (False, b'{"echo": "a"}')
        assert "idle_timeout" in goodbye_then_close(sock)  # closed after 0.2 s of silence
    assert server.stats()["idle_closed"] == 1


def test_max_connections_is_honoured(serve):
    # Both connections busy in a handler: a third waits (connected in the OS backlog, not
    # served) until one is done.
    release = threading.Event()
    entered = threading.Semaphore(0)

    def blocking(request):
        entered.release()
        release.wait(10)
        return request

    server = serve(blocking, protocol="framed", max_connections=2)
    busy = [framesock.Client(*server.address, protocol="framed") for _ in range(2)]
    threads = [threading.Thread(target=client.request, args=(str(n),)) for n, client in enumerate(busy)]
    for thread in threads:
        thread.start()
    assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
    third = framesock.Client(*server.address, protocol="framed", timeout=0.3)
    with pytest.raises(framesock.FramesockTimeoutError):
        third.request("3")  # connected but not served: no slot, and nobody idle to make room
    assert server.stats()["connections_active"] == 2
    release.set()
    for thread in threads:
        thread.join(10)
    late = framesock.Client(*server.address, protocol="framed")
    assert late.request("4") == "4"  # the idle ones made room
    for client in (*busy, third, late):
        client.close()


def test_a_full_server_closes_its_longest_idle_connection_to_make_room(serve):
    server = serve(protocol="framed", max_connections=2)
    with socket.create_connection(server.address, timeout=10) as oldest:
        wait_until(lambda: server.stats()["connections_active"] == 1)
        with socket.create_connection(server.address, timeout=10) as newer:
            wait_until(lambda: server.stats()["connections_active"] == 2)
            with framesock.Client(*server.address, protocol="framed") as third:
                assert third.request("3") == {"echo": "3"}
            assert "makes room" in goodbye_then_close(oldest)  # closed for room
            newer.sendall(frame(b"still here"))
            assert read_reply_frame(newer) == (False, b'{"echo": "still here"}')
    assert server.stats()["idle_evicted"] == 1


def test_shutdown_while_clients_are_mid_exchange(serve):
    entered = threading.Event()

    def slow(request):
        entered.set()
        time.sleep(0.3)
        return request

    server = serve(slow, protocol="framed")
    idle = socket.create_connection(server.address, timeout=10)
    idle.sendall(frame(b"first"))
    assert read_reply_frame(idle) == (False, b'"first"')  # accepted, now between requests
    entered.clear()
    client = framesock.Client(*server.address, protocol="framed")
    pending = PeerThread(lambda: client.request("in flight"))
    pending.start()
    assert entered.wait(5)
    server.shutdown(timeout=5.0)
    assert pending.outcome() == "in flight"  # the in-flight exchange finished
    assert "shutting down" in goodbye_then_close(idle)  # connections between requests were closed
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        framesock.start_client(*server.address)
    client.close()


def test_shutdown_from_inside_a_handler(serve):
    holder = {}

    def handler(request):
        holder["server"].shutdown()
        return "bye"

    server = serve(handler, protocol="framed")
    holder["server"] = server
    with framesock.Client(*server.address, protocol="framed") as client:
        assert client.request("stop") == "bye"
    done = PeerThread(server.serve_forever)
    done.start()
    with pytest.raises(RuntimeError, match="shut down"):
        done.outcome()


def test_serve_forever_returns_after_shutdown_from_another_thread():
    server = framesock.Server(echo, port=0)
    runner = PeerThread(server.serve_forever)
    runner.start()
    assert framesock.start_client(*server.address, message="x") == {"echo": "x"}
    server.shutdown()
    assert runner.outcome() is None


def test_client_reconnects_after_the_server_closed_an_idle_connection(serve):
    server = serve(protocol="framed", idle_timeout=0.1)
    with framesock.Client(*server.address, protocol="framed") as client:
        assert client.request("one") == {"echo": "one"}
        # A second connection, idle from later on: once its close has arrived here, the
        # client's (idle since before, closed first) has arrived too.
        with socket.create_connection(server.address[:2]) as probe:
            probe.settimeout(10)
            goodbye_then_close(probe)
        wait_until(lambda: server.stats()["idle_closed"] == 2)
        # The close is noticed before the request goes out: a new connection carries it.
        assert client.request("two") == {"echo": "two"}
        assert server.stats()["connections_accepted"] == 3


def test_closed_client_refuses_requests(serve):
    server = serve(protocol="framed")
    client = framesock.Client(*server.address, protocol="framed")
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.request("x")


def test_request_many_with_a_hundred_thousand_messages(serve):
    server = serve(None, response="ok", protocol="framed")
    with framesock.Client(*server.address, protocol="framed") as client:
        replies = client.request_many(f"message {i}" for i in range(100_000))
    assert len(replies) == 100_000 and set(replies) == {"ok"}


def test_request_many_larger_than_socket_buffers(serve):
    server = serve(protocol="framed")
    big = "x" * 100_000
    with framesock.Client(*server.address, protocol="framed") as client:
        replies = client.request_many([big] * 200)  # 20 MB each way
    assert all(reply == {"echo": big} for reply in replies)


def test_ipv6(serve):
    try:
        server = serve(host="::1", protocol="framed")
    except OSError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    assert server.address[0] == "::1"
    with framesock.Client("::1", server.address[1], protocol="framed") as client:
        assert client.request("six") == {"echo": "six"}
    classic = serve(host="::1")
    assert framesock.start_client("::1", classic.address[1], "x") == {"echo": "x"}


def test_unix_socket(serve, tmp_path):
    path = str(tmp_path / "framesock.sock")
    server = serve(path=path, protocol="framed")
    assert server.address == path
    with framesock.Client(path=path, protocol="framed") as client:
        assert client.request("unix") == {"echo": "unix"}
    serve(path=str(tmp_path / "classic.sock"))
    assert framesock.start_client(path=str(tmp_path / "classic.sock"), message="c") == {"echo": "c"}
    assert os.path.exists(path)


def test_address_with_port_zero_is_the_real_port(serve):
    server = serve()
    host, port = server.address
    assert host == "127.0.0.1" and port > 0


def test_address_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        with pytest.raises(OSError, match="Address already in use"):
            framesock.Server(echo, port=holder.getsockname()[1])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"protocol": "http"}, ValueError),
        ({"max_connections": 0}, ValueError),
        ({"idle_timeout": -1}, ValueError),
        ({"response": 1}, TypeError),  # with the echo handler: both given
    ],
)
def test_server_bad_arguments(kwargs, error):
    with pytest.raises(error):
        framesock.Server(echo, port=0, **kwargs)


@pytest.mark.parametrize(
    "name", ["port", "max_frame", "max_connections", "backlog", "handler_threads", "max_unsent", "max_buffered"]
)
@pytest.mark.parametrize("number", [2**63, 2**64, 10**40, -(2**63) - 1])
def test_integer_arguments_out_of_any_range_raise_value_error_naming_them(name, number):
    kwargs = {"port": 0, name: number}
    with pytest.raises(ValueError, match=f"^{name} must be .*, got {number}$"):
        framesock.Server(echo, **kwargs)


def test_client_bad_arguments():
    with pytest.raises(ValueError):
        framesock.Client(protocol="udp")
    with pytest.raises(ValueError):
        framesock.Client(port=-1)
    for number in [2**63, 2**200]:
        with pytest.raises(ValueError, match=f"^port must be in 0..65535, got {number}$"):
            framesock.Client(port=number)
        with pytest.raises(ValueError, match=f"^max_reply must be .*, got {number}$"):
            framesock.Client(max_reply=number)


def test_more_buffered_requests_than_one_batch(serve):
    # 600 requests arrive in one write: the server answers them in batches and must not stall
    # between batches with complete requests still buffered.
    server = serve(protocol="framed")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"".join(frame(str(i).encode()) for i in range(600)))
        for i in range(600):
            assert read_reply_frame(sock) == (False, json.dumps({"echo": str(i)}).encode())


def test_coroutine_handler_on_the_blocking_server_is_a_clear_error(serve, caplog):
    async def handler(request):
        return request

    server = serve(handler, protocol="framed")
    with framesock.Client(*server.address, protocol="framed") as client:
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            with pytest.raises(framesock.RemoteError, match="framesock.aio.Server"):
                client.request("x")


def test_one_client_shared_by_threads(serve):
    # Calls from several threads take turns on the one connection; each gets its own reply.
    server = serve(protocol="framed")
    client = framesock.Client(*server.address, protocol="framed")
    mismatches = []

    def work(n):
        for i in range(200):
            message = f"{n}:{i}"
            if client.request(message) != {"echo": message}:
                mismatches.append(message)

    threads = [PeerThread(lambda n=n: work(n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.outcome(60)
    client.close()
    assert mismatches == []
    assert server.stats()["connections_accepted"] == 1


def test_active_count_drops_when_shutdown_cuts_exchanges_short(serve, caplog):
    # Three clients are mid-request (half a frame sent) when shutdown's grace runs out.
    server = serve(protocol="framed", timeout=30)
    socks = [socket.create_connection(server.address, timeout=10) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(frame(b"0123456789")[:7])
        # Wait until the server has read every half frame: closing a socket with unread input
        # would send a reset instead of the close this test looks for.
        deadline = time.monotonic() + 5
        while server.stats()["bytes_in"] < 21 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats()["connections_active"] == 3
        assert server.stats()["bytes_in"] == 21
        with caplog.at_level(logging.CRITICAL, logger="framesock"):
            server.shutdown(timeout=0.1)
        assert server.stats()["connections_active"] == 0
        for sock in socks:
            assert sock.recv(10) == b""  # dropped
    finally:
        for sock in socks:
            sock.close()


# --- a listening socket made elsewhere (fd=) ------------------------------------------------------


def test_a_server_adopts_a_listening_socket_by_its_fd_and_leaves_it_to_its_owner(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = str(tmp_path / "adopted.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    try:
        for sock, target in [(tcp, dict(host="127.0.0.1", port=tcp.getsockname()[1])), (unix, dict(host=None, port=None, path=unix_path))]:
            with framesock.Server(lambda r: {"adopted": r}, fd=sock.fileno(), protocol="framed") as server:
                assert server.address == sock.getsockname()
                with framesock.Client(target.pop("host"), target.pop("port"), protocol="framed", **target) as client:
                    assert client.request("x") == {"adopted": "x"}
            # The owner's socket is still open and listening; a Unix socket keeps its file.
            assert sock.fileno() >= 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert os.path.exists(unix_path)
    finally:
        tcp.close()
        unix.close()


def test_an_fd_that_is_not_a_listening_socket_is_refused():
    unbound = socket.socket()
    read_end, write_end = os.pipe()
    try:
        for fd in [unbound.fileno(), read_end]:
            with pytest.raises(OSError, match="file descriptor"):
                framesock.Server(fd=fd)
        with pytest.raises(ValueError, match="fd and path"):
            framesock.Server(fd=unbound.fileno(), path="/tmp/x.sock")
        with pytest.raises(ValueError, match="fd must be"):
            framesock.Server(fd=-1)
    finally:
        unbound.close()
        os.close(read_end)
        os.close(write_end)


IO_THREADS_PROGRAM = """
import os, time, framesock
def names():
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with framesock.Server(port=0, io_threads=1) as server:
    # A new thread names itself once it first runs: on a busy machine, a moment after it exists.
    deadline = time.monotonic() + 10
    while names().count("framesock-io") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert names().count("framesock-io") == 1, names()
    try:
        framesock.Server(port=0, io_threads=2)
    except ValueError as err:
        assert "already runs 1 I/O threads" in str(err), err
    else:
        raise AssertionError("io_threads=2 accepted after the engine started with 1")
"""


def test_io_threads_sets_the_engines_thread_count_once():
    done = subprocess.run([sys.executable, "-c", IO_THREADS_PROGRAM], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
