"""Handlers run on handler threads: one that blocks holds up only its own exchange.

A blocked handler here waits on an Event the test sets, so "the fast exchange was not held up"
is a fact (it completed while the other handler was still blocked), not a timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import framesock
from conftest import PeerThread, refuses, wait_until


class Blocker:
    """A handler that blocks on "block" requests until released, and answers others at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: str) -> dict:
        if request == "block":
            self.entered.set()
            self.release.wait(30)
        return {"echo": request}


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_a_blocked_handler_holds_up_only_its_own_exchange(protocol):
    blocker = Blocker()
    with framesock.Server(blocker, port=0, protocol=protocol) as server, framesock.Server(
        response={"static": True}, port=0, protocol=protocol
    ) as other:
        host, port = server.address[:2]
        slow = PeerThread(lambda: framesock.Client(host, port, protocol=protocol).request("block"))
        slow.start()
        try:
            assert blocker.entered.wait(10)
            # Same server, another client; a second server with a static reply.
            with framesock.Client(host, port, protocol=protocol, timeout=5) as client:
                assert client.request("fast") == {"echo": "fast"}
            with framesock.Client(*other.address[:2], protocol=protocol, timeout=5) as client:
                assert client.request("x") == {"static": True}
            assert not blocker.release.is_set() and slow.is_alive()
        finally:
            blocker.release.set()
        assert slow.outcome() == {"echo": "block"}


def test_handlers_run_at_once_up_to_handler_threads():
    # All eight must be inside the handler together for the barrier to let any of them out.
    barrier = threading.Barrier(8, timeout=10)

    def handler(request):
        barrier.wait()
        return request

    with framesock.Server(handler, port=0, handler_threads=8) as server:
        clients = [PeerThread(lambda i=i: framesock.start_client(*server.address[:2], message=str(i)))
                   for i in range(8)]
        for client in clients:
            client.start()
        assert sorted(client.outcome() for client in clients) == [str(i) for i in range(8)]


def test_handler_threads_bounds_the_handlers_running_at_once():
    blocker = Blocker()
    with framesock.Server(blocker, port=0, protocol="framed", handler_threads=1) as server:
        host, port = server.address[:2]
        slow = PeerThread(lambda: framesock.Client(host, port, protocol="framed").request("block"))
        slow.start()
        try:
            assert blocker.entered.wait(10)
            with framesock.Client(host, port, protocol="framed", timeout=0.3) as client:
                with pytest.raises(framesock.FramesockTimeoutError):
                    client.request("fast")  # the one handler thread is taken
        finally:
            blocker.release.set()
        assert slow.outcome() == {"echo": "block"}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_handlers_run_under_sched_batch_and_the_callers_thread_is_left_alone():
    policy_before = os.sched_getscheduler(0)

    def handler(request: str) -> dict:
        return {"policy": os.sched_getscheduler(0)}

    with framesock.Server(handler, port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed") as client:
            assert client.request("which policy?") == {"policy": os.SCHED_BATCH}
    assert os.sched_getscheduler(0) == policy_before


@pytest.mark.parametrize("count", [0, -1, "2"])
def test_handler_threads_must_be_a_positive_integer(count):
    with pytest.raises((ValueError, TypeError)):
        framesock.Server(lambda r: r, port=0, handler_threads=count)


def test_shutdown_returns_while_a_handler_is_stuck():
    blocker = Blocker()
    server = framesock.Server(blocker, port=0, protocol="framed")
    server.start()
    stuck = PeerThread(lambda: framesock.Client(*server.address[:2], protocol="framed").request("block"))
    stuck.start()
    try:
        assert blocker.entered.wait(10)
        shutting = PeerThread(lambda: server.shutdown(timeout=0.2))
        shutting.start()
        shutting.outcome(timeout=10)  # returned, though the handler is still blocked
        assert not blocker.release.is_set()
        # The stuck exchange was abandoned: its client's connection is closed.
        with pytest.raises(ConnectionError):
            stuck.outcome()
        assert server.stats()["connections_active"] == 0
    finally:
        blocker.release.set()


def test_shutdown_from_inside_a_handler():
    holder = {}

    def handler(request):
        holder["server"].shutdown()
        return "bye"

    server = framesock.Server(handler, port=0)
    holder["server"] = server
    server.start()
    assert framesock.start_client(*server.address[:2], timeout=5) == "bye"
    wait_until(lambda: refuses(server.address))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_ends_serve_forever_while_a_handler_is_stuck():
    script = textwrap.dedent(
        """
        import sys, threading, time, framesock

        def handler(request):
            print("in handler", flush=True)
            time.sleep(1e9)

        server = framesock.Server(handler, port=0)
        threading.Thread(target=framesock.start_client, args=server.address[:2],
                         kwargs={"timeout": None}, daemon=True).start()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"in handler\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 42, err.decode()
    assert out == b"interrupted\n"


def test_log_records_reach_the_framesock_logger(caplog):
    def handler(request):
        raise ValueError("boom")

    with caplog.at_level("ERROR", logger="framesock"):
        with framesock.Server(handler, port=0, protocol="framed") as server:
            with framesock.Client(*server.address[:2], protocol="framed") as client:
                with pytest.raises(framesock.RemoteError):
                    client.request("x")
            wait_until(lambda: any("ValueError: boom" in r.getMessage() for r in caplog.records))
    record = next(r for r in caplog.records if "boom" in r.getMessage())
    assert record.exc_info and record.exc_info[0] is ValueError


class LoopFailure(BaseException):
    """Stands for an exception in a handler thread's own loop (not in a handler)."""


def test_a_handler_thread_whose_own_loop_fails_is_replaced(monkeypatch, capsys):
    # A handler thread starts its reserve thread just before its first call; here that start
    # fails with an exception no handler raised. The call in hand fails with it, the thread
    # ends, and a new one takes its place: later requests are answered, none hangs.
    import framesock._support as support

    start = support.start_handler_thread
    failures = []

    def start_but_fail_once_on_a_handler_thread(source):
        if threading.current_thread().name.startswith("framesock-handler") and not failures:
            failures.append(source)
            source.not_started()
            raise LoopFailure("the loop failed")
        start(source)

    monkeypatch.setattr(support, "start_handler_thread", start_but_fail_once_on_a_handler_thread)
    with framesock.Server(lambda request: {"echo": request}, port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed", timeout=10) as client:
            with pytest.raises(framesock.RemoteError, match="the loop failed"):
                client.request("first")
            assert [client.request(str(n)) for n in range(20)] == [{"echo": str(n)} for n in range(20)]
    assert len(failures) == 1
    assert "LoopFailure: the loop failed" in capsys.readouterr().err


def test_the_framesock_logger_has_a_null_handler():
    import logging

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("framesock").handlers)


def test_a_dropped_client_closes_its_connection():
    with framesock.Server(response=1, port=0, protocol="framed") as server:
        client = framesock.Client(*server.address[:2], protocol="framed")
        assert client.request("x") == 1
        assert server.stats()["connections_active"] == 1
        del client
        wait_until(lambda: server.stats()["connections_active"] == 0)


@pytest.mark.skipif(sys.platform != "linux", reason="reads through ctypes.PyDLL(None), which keeps the GIL")
def test_static_replies_go_on_while_a_handler_holds_the_gil():
    # The handler blocks in read() *holding the GIL* (ctypes.PyDLL keeps it), until a separate
    # process writes to a pipe; that process writes only after a static server has answered it.
    # If static replies needed the GIL, nobody could release the handler: the test would fail
    # (the other process gives up after its timeout and says so).
    import ctypes
    import os

    entered_r, entered_w = os.pipe()
    release_r, release_w = os.pipe()
    libc = ctypes.PyDLL(None)

    def handler(request):
        os.write(entered_w, b"e")
        buf = ctypes.create_string_buffer(1)
        libc.read(release_r, buf, 1)  # holds the GIL while it waits
        return buf.raw.decode()

    script = textwrap.dedent(
        """
        import os, sys, framesock
        entered, release, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
        os.read(entered, 1)
        try:
            reply = framesock.start_client(port=port, timeout=10)
            os.write(release, b"y" if reply == {"static": True} else b"n")
        except Exception:
            os.write(release, b"n")
        """
    )
    try:
        with framesock.Server(handler, port=0) as blocking, framesock.Server(
            response={"static": True}, port=0
        ) as static:
            peer = subprocess.Popen(
                [sys.executable, "-c", script, str(entered_r), str(release_w), str(static.address[1])],
                pass_fds=(entered_r, release_w),
            )
            try:
                reply = framesock.start_client(*blocking.address[:2], timeout=30)
                assert peer.wait(30) == 0
            finally:
                peer.kill()
                peer.wait()
        assert reply == "y"  # the static server answered while the GIL was held
    finally:
        for fd in (entered_r, entered_w, release_r, release_w):
            os.close(fd)


def test_a_plain_handler_answers_one_connection_in_order_on_aio_server_too():
    import asyncio

    from framesock import aio

    running = []
    overlapped = []
    lock = threading.Lock()

    def handler(request):
        with lock:
            running.append(request)
            overlapped.append(len(running) > 1)
        threading.Event().wait(0.01)  # long enough for a second call to overlap, if allowed
        with lock:
            running.remove(request)
        return request

    async def main():
        async with aio.Server(handler, port=0, protocol="framed") as server:
            async with aio.Client(*server.address[:2], protocol="framed") as client:
                return await client.request_many([str(i) for i in range(10)])

    assert asyncio.run(main()) == [str(i) for i in range(10)]
    assert not any(overlapped)
