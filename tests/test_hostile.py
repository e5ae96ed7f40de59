"""Hostile peers and bad arguments: every resource bounded, no panic, no reply mixed up.

Each test plays one misbehaviour with a peer written here against a real server or client
on loopback, and checks that framesock stays within its limits and says what happened.
"""

from __future__ import annotations

import asyncio

import pytest

import framesock
from framesock import aio


# --- no panic reaches Python ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e20, float("inf"), float("nan"), -1.0, 0.0])
def test_timeouts_out_of_range_are_value_errors_naming_the_argument(value):
    with pytest.raises(ValueError, match="timeout"):
        framesock.Client("127.0.0.1", 9, timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        framesock.Server(port=0, timeout=value)
    with pytest.raises(ValueError, match="idle_timeout"):
        framesock.Server(port=0, idle_timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        framesock.start_client(port=9, timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        aio.Client(port=9, timeout=value)
    with framesock.Server(port=0) as server:
        with pytest.raises(ValueError, match="timeout"):
            server.shutdown(timeout=value)


@pytest.mark.parametrize("name", ["max_connections", "handler_threads"])
@pytest.mark.parametrize("value", [0, -1, 2**62])
def test_counts_out_of_range_are_value_errors_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        framesock.Server(port=0, **{name: value})


def test_a_huge_but_allowed_timeout_works():
    with framesock.Server(port=0, protocol="framed", timeout=1e9, idle_timeout=1e9) as server:
        with framesock.Client(*server.address[:2], protocol="framed", timeout=1e9) as client:
            assert client.request("x") == {"key": "id", "val": 123}
        server.shutdown(timeout=1e9)


# --- Unix sockets --------------------------------------------------------------------------------


def test_a_stale_socket_file_is_replaced(tmp_path):
    import socket as pysocket

    path = str(tmp_path / "stale.sock")
    left_behind = pysocket.socket(pysocket.AF_UNIX)
    left_behind.bind(path)
    left_behind.close()  # the file stays, nothing listens: what a crashed server leaves
    with framesock.Server(path=path, protocol="framed") as server:
        with framesock.Client(path=path, protocol="framed") as client:
            assert client.request("x") == {"key": "id", "val": 123}
        assert server.address == path
    assert not (tmp_path / "stale.sock").exists()


def test_a_path_where_something_listens_is_address_in_use(tmp_path):
    import errno
    import socket as pysocket

    path = str(tmp_path / "busy.sock")
    listening = pysocket.socket(pysocket.AF_UNIX)
    listening.bind(path)
    listening.listen(1)
    try:
        with pytest.raises(OSError) as caught:
            framesock.Server(path=path)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        listening.close()


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(OSError):
        framesock.Server(path=str(path))
    assert path.read_text() == "keep me"


def test_the_socket_file_is_removed_at_shutdown(tmp_path):
    path = tmp_path / "s.sock"
    server = framesock.Server(path=str(path))
    server.start()
    assert path.exists()
    server.shutdown()
    assert not path.exists()
    # So the same path serves again at once.
    with framesock.Server(path=str(path), protocol="framed"):
        with framesock.Client(path=str(path), protocol="framed") as client:
            assert client.request("again") == {"key": "id", "val": 123}


def test_the_socket_file_of_a_one_shot_server_is_removed(tmp_path):
    import threading

    path = str(tmp_path / "once.sock")
    result = {}
    ready = threading.Event()
    thread = threading.Thread(target=lambda: result.update(framesock.start_server(path=path, ready=lambda a: ready.set())))
    thread.start()
    assert ready.wait(10)
    assert framesock.start_client(path=path) == {"key": "id", "val": 123}
    thread.join(10)
    assert result["request"] == "msg from client"
    assert not (tmp_path / "once.sock").exists()


def test_an_empty_path_is_a_value_error():
    with pytest.raises(ValueError, match="path"):
        framesock.Server(path="")
    with pytest.raises(ValueError, match="path"):
        framesock.Client(path="")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="abstract names are Linux's")
def test_abstract_socket_names_work(tmp_path):
    import os

    name = f"\0framesock-test-{os.getpid()}-{id(tmp_path)}"
    with framesock.Server(path=name, protocol="framed") as server:
        assert server.address == name
        with framesock.Client(path=name, protocol="framed") as client:
            assert client.request("abstract") == {"key": "id", "val": 123}
