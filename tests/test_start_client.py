"""start_client(): the seed's client, its message types, and every way a server can misbehave."""

from __future__ import annotations

import json
import socket
import threading

import pytest

import framesock
from conftest import SEED_MESSAGE, SEED_REPLY, frame, seed_style_server


def read_frame(conn: socket.socket) -> bytes:
    """Reads one whole request frame (a careful peer, unlike the seed's server)."""
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client left mid-frame")
        data += chunk
    return data[4:]


def test_talks_to_a_seed_style_server(raw_server):
    server = raw_server(seed_style_server)
    assert framesock.start_client(port=server.port) == {"key": "id", "val": 123}
    assert server.thread.outcome() == SEED_MESSAGE


def test_header_and_payload_arrive_in_one_write(raw_server):
    # The seed's server does recv(4) then recv(length): both must find the whole frame waiting.
    server = raw_server(lambda conn: seed_style_server(conn))
    message = "x" * 5000
    framesock.start_client(port=server.port, message=message)
    assert server.thread.outcome() == message.encode()


@pytest.mark.parametrize(
    ("message", "sent"),
    [
        ("héllo", "héllo".encode()),
        (b"\x00\xffraw", b"\x00\xffraw"),
        (bytearray(b"ba"), b"ba"),
        ({"a": [1, "é"]}, json.dumps({"a": [1, "é"]}).encode()),
        ([1, 2, 3], b"[1, 2, 3]"),
        ("", b""),
    ],
)
def test_message_types(raw_server, message, sent):
    server = raw_server(lambda conn: (read_frame(conn), conn.sendall(b"{}"))[0])
    assert framesock.start_client(port=server.port, message=message) == {}
    assert server.thread.outcome() == sent


@pytest.mark.parametrize(
    ("reply", "value"),
    [(b"[1, 2]", [1, 2]), (b'"text"', "text"), (b"3.5", 3.5), (b"null", None), (b"true", True)],
)
def test_any_json_reply_becomes_the_python_value(raw_server, reply, value):
    server = raw_server(lambda conn: seed_style_server(conn, reply))
    assert framesock.start_client(port=server.port) == value


def test_multi_megabyte_unicode_reply_is_read_whole(raw_server):
    value = {"text": "ünïcødé ✓ " * 300_000, "numbers": list(range(100_000))}
    reply = json.dumps(value, ensure_ascii=False).encode()
    assert len(reply) > 4_000_000
    server = raw_server(lambda conn: seed_style_server(conn, reply))
    assert framesock.start_client(port=server.port) == value


def test_reply_in_small_pieces_is_read_to_the_close(raw_server):
    def dribble(conn):
        read_frame(conn)
        for byte in SEED_REPLY:
            conn.sendall(bytes([byte]))

    server = raw_server(dribble)
    assert framesock.start_client(port=server.port) == {"key": "id", "val": 123}


def test_broken_json_says_where(raw_server):
    server = raw_server(lambda conn: seed_style_server(conn, b'{"key": "id", "val": 12'))
    with pytest.raises(framesock.JSONDecodeError) as caught:
        framesock.start_client(port=server.port)
    err = caught.value
    assert isinstance(err, json.JSONDecodeError) and isinstance(err, ValueError)
    assert err.pos == 23 and err.lineno == 1
    assert "line 1 column" in str(err)


def test_trailing_garbage_is_broken_json(raw_server):
    server = raw_server(lambda conn: seed_style_server(conn, b"{} extra"))
    with pytest.raises(framesock.JSONDecodeError, match="Extra data") as caught:
        framesock.start_client(port=server.port)
    assert (caught.value.pos, caught.value.lineno, caught.value.colno) == (3, 1, 4)


def test_not_utf8_reply_is_broken_json(raw_server):
    server = raw_server(lambda conn: seed_style_server(conn, b'"\xff"'))
    with pytest.raises(framesock.JSONDecodeError):
        framesock.start_client(port=server.port)


def test_close_without_reply(raw_server):
    server = raw_server(read_frame)
    with pytest.raises(framesock.ConnectionClosedError, match="before sending anything") as caught:
        framesock.start_client(port=server.port)
    assert isinstance(caught.value, ConnectionError)


def test_silent_server_times_out(raw_server):
    release = threading.Event()
    server = raw_server(lambda conn: (read_frame(conn), release.wait(10)))
    try:
        with pytest.raises(framesock.FramesockTimeoutError, match="waiting for the reply") as caught:
            framesock.start_client(port=server.port, timeout=0.3)
        assert isinstance(caught.value, TimeoutError)
    finally:
        release.set()


def test_reply_over_max_reply(raw_server):
    server = raw_server(lambda conn: seed_style_server(conn, b"[" + b"1," * 1000 + b"1]"))
    with pytest.raises(framesock.FrameTooLargeError, match="limit of 100") as caught:
        framesock.start_client(port=server.port, max_reply=100)
    assert isinstance(caught.value, ValueError)


def test_endless_reply_stops_at_max_reply(raw_server):
    def flood(conn):
        read_frame(conn)
        try:
            while True:
                conn.sendall(b" " * 65536)
        except OSError:
            pass  # the client hung up, as it should

    server = raw_server(flood)
    with pytest.raises(framesock.FrameTooLargeError):
        framesock.start_client(port=server.port, max_reply=1_000_000)


def test_connection_refused_is_the_builtin():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(ConnectionRefusedError):
            framesock.start_client(port=port)


def test_talks_to_start_server(framesock_server):
    server = framesock_server(handler=lambda request: {"got": request})
    assert framesock.start_client(port=server.port, message="ping") == {"got": "ping"}
    server.outcome()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"port": 65536}, ValueError, "port"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -3}, ValueError, "timeout"),
        ({"max_reply": -5}, ValueError, "max_reply"),
        ({"message": object()}, TypeError, "not JSON serializable"),
        ({"message": {"a": object()}}, TypeError, "not JSON serializable"),
        ({"message": "\ud800"}, UnicodeEncodeError, "surrogate"),
    ],
)
def test_bad_arguments_fail_before_touching_the_network(kwargs, error, match):
    # Port 9 (discard) is never listened on here: reaching the network would raise OSError.
    kwargs = {"port": 9, **kwargs}
    with pytest.raises(error, match=match):
        framesock.start_client(**kwargs)
