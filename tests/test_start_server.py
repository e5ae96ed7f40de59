"""start_server(): the seed's one-shot server, its options, and every way a client can misbehave."""

from __future__ import annotations

import errno
import json
import socket
import struct
import time

import pytest

import framesock
from conftest import SEED_MESSAGE, SEED_REPLY, frame, raw_exchange, seed_style_client


def test_default_reply_is_the_seeds_bytes_then_close(framesock_server):
    server = framesock_server()
    assert raw_exchange(server.port, frame(SEED_MESSAGE)) == SEED_REPLY
    exchange = server.outcome()
    assert exchange["request"] == "msg from client"
    assert exchange["request_bytes"] == SEED_MESSAGE
    assert exchange["reply"] == {"key": "id", "val": 123}
    assert exchange["peer"][0] == "127.0.0.1"
    assert exchange["address"] == ("127.0.0.1", server.port)


def test_seed_style_client_reads_the_reply(framesock_server):
    server = framesock_server()
    assert seed_style_client(server.port) == {"key": "id", "val": 123}
    assert server.outcome()["request_bytes"] == SEED_MESSAGE


def test_static_response_is_sent_in_json_dumps_style(framesock_server):
    value = {"ok": True, "items": [1, 2.5, None, "é"], "nested": {"a": []}}
    server = framesock_server(response=value)
    reply = raw_exchange(server.port, frame(b"x"))
    assert reply == json.dumps(value).encode()
    assert server.outcome()["reply"] == value


@pytest.mark.parametrize("value", ["just text", 42, [1, 2], False, 0.5])
def test_response_may_be_any_json_value(framesock_server, value):
    server = framesock_server(response=value)
    assert json.loads(raw_exchange(server.port, frame(b"x"))) == value
    server.outcome()


def test_handler_gets_request_text_and_its_return_value_is_sent(framesock_server):
    server = framesock_server(handler=lambda request: {"echo": request, "length": len(request)})
    reply = raw_exchange(server.port, frame("héllo wörld".encode()))
    assert json.loads(reply) == {"echo": "héllo wörld", "length": 11}
    assert server.outcome()["reply"] == {"echo": "héllo wörld", "length": 11}


def test_handler_can_receive_bytes_or_parsed_json(framesock_server):
    server = framesock_server(handler=lambda request: {"type": type(request).__name__}, request_as="bytes")
    assert json.loads(raw_exchange(server.port, frame(b"\xff"))) == {"type": "bytes"}
    server.outcome()
    server = framesock_server(handler=lambda request: request["a"] + 1, request_as="json")
    assert json.loads(raw_exchange(server.port, frame(b'{"a": 41}'))) == 42
    server.outcome()


def test_payload_that_is_not_utf8_is_kept_whole(framesock_server):
    server = framesock_server()
    payload = b"\xff\xfe half \xc3"
    assert raw_exchange(server.port, frame(payload)) == SEED_REPLY
    exchange = server.outcome()
    assert exchange["request_bytes"] == payload
    assert exchange["request"] == payload.decode("utf-8", errors="replace")


def test_empty_payload_is_a_request(framesock_server):
    server = framesock_server()
    assert raw_exchange(server.port, frame(b"")) == SEED_REPLY
    assert server.outcome()["request_bytes"] == b""


def test_multi_megabyte_unicode_request_and_reply(framesock_server):
    text = "ünïcødé ✓ " * 300_000  # ~4 MB of UTF-8
    server = framesock_server(handler=lambda request: {"echo": request})
    reply = raw_exchange(server.port, frame(text.encode()))
    assert json.loads(reply) == {"echo": text}
    assert server.outcome()["request"] == text


def test_frame_sent_one_byte_at_a_time(framesock_server):
    server = framesock_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in frame(SEED_MESSAGE):
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        assert sock.recv(1024) == SEED_REPLY
    assert server.outcome()["request_bytes"] == SEED_MESSAGE


def test_oversized_header_is_refused_before_any_payload(framesock_server):
    server = framesock_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\xff\xff\xff\xff")
        with pytest.raises(framesock.FrameTooLargeError, match="4294967295") as caught:
            server.outcome()
        assert sock.recv(1024) == b""  # closed without a reply
    assert isinstance(caught.value, ValueError)


def test_max_frame_is_the_limit(framesock_server):
    server = framesock_server(max_frame=10)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(struct.pack(">I", 11))
        with pytest.raises(framesock.FrameTooLargeError, match="11 payload bytes, over the limit of 10"):
            server.outcome()
    server = framesock_server(max_frame=10)
    assert raw_exchange(server.port, frame(b"0123456789")) == SEED_REPLY
    server.outcome()


def test_half_a_frame_then_close(framesock_server):
    server = framesock_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(frame(b"0123456789")[:7])
    with pytest.raises(framesock.ConnectionClosedError, match="3 of 10 payload bytes") as caught:
        server.outcome()
    assert isinstance(caught.value, ConnectionError)


def test_half_a_header_then_close(framesock_server):
    server = framesock_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"\x00\x00")
    with pytest.raises(framesock.ConnectionClosedError, match="2 of 4 header bytes"):
        server.outcome()


def test_close_without_sending_anything(framesock_server):
    server = framesock_server()
    socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    with pytest.raises(framesock.ConnectionClosedError, match="before sending anything"):
        server.outcome()


def test_half_a_frame_then_silence_times_out(framesock_server):
    server = framesock_server(timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(frame(b"0123456789")[:7])
        with pytest.raises(framesock.FramesockTimeoutError, match="waiting for the request") as caught:
            server.outcome()
    assert isinstance(caught.value, TimeoutError)


def test_slow_drip_is_bounded_by_the_timeout(framesock_server):
    # A byte every 0.1 s would keep a per-recv timeout happy forever; the whole request has 0.5 s.
    server = framesock_server(timeout=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for byte in frame(b"x" * 100):
            try:
                sock.sendall(bytes([byte]))
            except ConnectionError:
                break  # the server gave up on this request and closed: its outcome says why
            if not server.thread.is_alive():
                break
            time.sleep(0.1)  # the drip's pace
        with pytest.raises(framesock.FramesockTimeoutError):
            server.outcome()


def test_handler_exception_reaches_the_caller_and_client_gets_no_reply(framesock_server):
    def handler(request):
        raise RuntimeError("handler failed")

    server = framesock_server(handler=handler)
    assert raw_exchange(server.port, frame(b"x")) == b""
    with pytest.raises(RuntimeError, match="handler failed"):
        server.outcome()


def test_handler_reply_that_cannot_be_serialised(framesock_server):
    server = framesock_server(handler=lambda request: {"when": object()})
    assert raw_exchange(server.port, frame(b"x")) == b""
    with pytest.raises(TypeError, match="not JSON serializable"):
        server.outcome()


def test_invalid_json_request_when_handler_wants_json(framesock_server):
    server = framesock_server(handler=lambda request: request, request_as="json")
    assert raw_exchange(server.port, frame(b'{"a": ')) == b""
    with pytest.raises(framesock.JSONDecodeError):
        server.outcome()


def test_ipv6_loopback(framesock_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = framesock_server(host="::1")
    except OSError as err:
        pytest.skip(f"IPv6 loopback unavailable: {err}")
    assert raw_exchange(server.port, frame(SEED_MESSAGE), family=socket.AF_INET6, host="::1") == SEED_REPLY
    assert server.outcome()["peer"][0] == "::1"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"port": 70000}, ValueError, "port"),
        ({"port": -1}, ValueError, "port"),
        ({"port": "80"}, TypeError, "int"),
        ({"timeout": -1.0}, ValueError, "timeout"),
        ({"timeout": float("nan")}, ValueError, "timeout"),
        ({"max_frame": -1}, ValueError, "max_frame"),
        ({"max_frame": 2**32}, ValueError, "max_frame"),
        ({"port": 2**64}, ValueError, "port must be in 0..65535, got 18446744073709551616"),
        ({"max_frame": 2**63}, ValueError, "max_frame"),
        ({"backlog": -(2**80)}, ValueError, "backlog"),
        ({"backlog": 0}, ValueError, "backlog"),
        ({"response": {"a": {1, 2}}}, TypeError, "not JSON serializable"),
        ({"response": float("inf")}, ValueError, "float"),
        ({"response": {}, "handler": print}, TypeError, "not both"),
        ({"handler": "not callable"}, TypeError, "callable"),
        ({"handler": print, "request_as": "xml"}, ValueError, "request_as"),
    ],
)
def test_bad_arguments_fail_before_touching_the_network(kwargs, error, match):
    # Port 1 would need privileges to bind: reaching the network would raise PermissionError.
    kwargs = {"port": 1, **kwargs}
    with pytest.raises(error, match=match):
        framesock.start_server(**kwargs)


def test_circular_response_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        framesock.start_server(port=1, response=loop)


def test_address_in_use_is_an_os_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        with pytest.raises(OSError) as caught:
            framesock.start_server(port=holder.getsockname()[1])
    assert caught.value.errno == errno.EADDRINUSE
