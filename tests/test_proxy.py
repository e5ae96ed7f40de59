"""The PROXY protocol (v1 and v2) on the server: what a balancer's header says becomes the
caller's address; a connection without a valid header, or from outside ``proxy_from``, costs
only itself. The peers here write the headers by hand, byte by byte where it matters."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import struct
import time

import pytest
import trustme

import framesock
from framesock import aio
from conftest import frame, read_reply_frame, wait_until

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(client=("192.0.2.1", 56324), server=("198.51.100.2", 443)) -> bytes:
    family = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()


def v2(client=("192.0.2.1", 56324), server=("198.51.100.2", 443), *, local=False, tlvs=b"") -> bytes:
    command = 0x20 if local else 0x21
    if isinstance(client, str):  # a Unix socket path
        body = client.encode().ljust(108, b"\0") + b"/balancer".ljust(108, b"\0")
        family = 0x31
    else:
        ip = ipaddress.ip_address(client[0])
        family = 0x11 if ip.version == 4 else 0x21
        body = ip.packed + ipaddress.ip_address(server[0]).packed + struct.pack(">HH", client[1], server[1])
    body += tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack(">H", len(body)) + body


def echo_caller(request, caller):
    return {"request": request, "address": list(caller.address), "proxy": caller.proxy_address}


def exchange(port: int, header: bytes, payload: bytes = b"hi", *, pieces: int = 1) -> dict:
    """Sends ``header`` (in ``pieces`` writes with pauses) and one framed request; the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        size = max(1, len(header) // pieces)
        for start in range(0, len(header), size):
            sock.sendall(header[start : start + size])
            if pieces > 1:
                time.sleep(0.02)
        sock.sendall(frame(payload))
        is_error, reply = read_reply_frame(sock)
        assert not is_error, reply
        return json.loads(reply)


def refused(port: int, data: bytes) -> bytes:
    """Sends ``data``, then reads what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        said = b""
        try:
            while chunk := sock.recv(4096):
                said += chunk
        except ConnectionResetError:
            pass
        return said


@pytest.fixture
def proxied(start_server):
    def start(**kwargs):
        kwargs.setdefault("protocol", "framed")
        return start_server(echo_caller, proxy_protocol=True, **kwargs)

    return start


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_the_header_names_the_caller_and_the_balancer_stays_known(proxied, make):
    server = proxied()
    reply = exchange(server.port, make())
    assert reply["address"] == ["192.0.2.1", 56324]
    assert reply["proxy"][0] == "127.0.0.1"
    assert reply["request"] == "hi"
    ipv6 = exchange(server.port, make(("2001:db8::7", 4000), ("2001:db8::1", 9000)))
    assert ipv6["address"][:2] == ["2001:db8::7", 4000]
    assert server.stats()["errors"]["proxy"] == 0


def test_a_v2_unix_source_and_tlvs(proxied):
    server = proxied()
    reply = exchange(server.port, v2("/run/client.sock", tlvs=b"\x04\x00\x02ab"))
    assert reply["address"] == list("/run/client.sock")  # a path: list() of a str
    assert exchange(server.port, v2(tlvs=b"\x01\x00\x05hello"))["address"] == ["192.0.2.1", 56324]


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2(local=True)], ids=["v1 UNKNOWN", "v2 LOCAL"])
def test_the_balancers_own_check_keeps_the_connections_address(proxied, header):
    server = proxied()
    reply = exchange(server.port, header)
    assert reply["address"][0] == "127.0.0.1"
    assert reply["proxy"][0] == "127.0.0.1"


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_a_header_in_pieces_and_a_request_in_its_packet(proxied, make):
    server = proxied()
    # Byte by byte: the server must wait for the rest, and read nothing past it.
    assert exchange(server.port, make(), pieces=len(make()))["address"] == ["192.0.2.1", 56324]
    # Header and request in one write: the request's bytes are the protocol's, not the header's.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(make() + frame(b"one") + frame(b"two"))
        for expected in ("one", "two"):
            assert json.loads(read_reply_frame(sock)[1])["request"] == expected


def test_classic_protocol_and_start_server(proxied, framesock_server):
    server = proxied(protocol="classic")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(v1() + frame(b"classic"))
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert json.loads(reply)["address"] == ["192.0.2.1", 56324]

    one = framesock_server(proxy_protocol=True)
    with socket.create_connection(("127.0.0.1", one.port), timeout=10) as sock:
        sock.sendall(v2(("198.51.100.9", 1234)) + frame(b"once"))
        while sock.recv(4096):
            pass
    exchanged = one.outcome()
    assert exchanged["peer"] == ("198.51.100.9", 1234)
    assert exchanged["proxy_address"][0] == "127.0.0.1"
    assert exchanged["request"] == "once"


def test_start_server_refuses_a_connection_without_a_header(framesock_server):
    one = framesock_server(proxy_protocol=True)
    refused(one.port, frame(b"no header"))
    with pytest.raises(framesock.ProtocolError, match="PROXY"):
        one.outcome()


HOSTILE = {
    "no header": frame(b"plain request"),
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "v1 garbage": b"PROXY TCP4 not-an-address 198.51.100.2 1 2\r\n",
    "v1 too long": b"PROXY TCP4 " + b"1" * 200,
    "v1 bare newline": b"PROXY TCP4 192.0.2.1\n",
    "v2 bad version": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2 too large": V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(64),
    "v2 short body": V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
    "v2 bad family": V2_SIGNATURE + b"\x21\x51\x00\x00",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_bad_header_costs_only_its_connection(proxied, name, caplog):
    server = proxied()
    caplog.set_level(logging.WARNING, logger="framesock")
    assert b"no header" not in refused(server.port, HOSTILE[name])  # closed, nothing answered
    wait_until(lambda: server.stats()["errors"]["proxy"] == 1)
    assert server.stats()["requests"] == 0
    assert exchange(server.port, v1())["address"] == ["192.0.2.1", 56324]
    wait_until(lambda: any("PROXY" in r.getMessage() for r in caplog.records))


def test_a_cut_or_slow_header_is_refused_in_its_own_time(proxied, caplog):
    server = proxied(timeout=0.5)
    caplog.set_level(logging.WARNING, logger="framesock")
    # Cut short: half a header, then the close.
    refused(server.port, v2()[:20])
    wait_until(lambda: server.stats()["errors"]["proxy"] == 1)
    # Too slow: half a header, then silence past the limit (0.5 s here: `timeout`, shorter
    # than the header's own 3 s).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(v1()[:10])
        assert sock.recv(100) == b""  # the server closes it, counted first
    assert server.stats()["errors"]["proxy"] == 2
    assert any("timed out after 0.5 s reading the PROXY protocol header" in r.getMessage() for r in caplog.records)
    assert exchange(server.port, v1())["request"] == "hi"


def test_only_addresses_in_proxy_from_may_send_a_header(proxied):
    server = proxied(proxy_from=["10.0.0.0/8", "2001:db8::/32"])
    refused(server.port, v1())
    wait_until(lambda: server.stats()["errors"]["proxy"] == 1)
    trusting = proxied(proxy_from=("10.0.0.0/8", "127.0.0.1"))
    assert exchange(trusting.port, v1())["address"] == ["192.0.2.1", 56324]


def test_a_check_that_connects_and_leaves_is_not_an_error(proxied):
    server = proxied()
    socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
    wait_until(lambda: server.stats()["connections_empty"] == 2)
    assert server.stats()["errors"]["proxy"] == 0


def test_a_unix_socket_peer_is_taken(start_server, tmp_path):
    server = start_server(echo_caller, path=str(tmp_path / "s"), protocol="framed", proxy_protocol=True, proxy_from=["10.0.0.0/8"])
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(tmp_path / "s"))
        sock.sendall(v2() + frame(b"u"))
        assert json.loads(read_reply_frame(sock)[1])["address"] == ["192.0.2.1", 56324]


def test_the_header_comes_before_tls(start_server):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    tls = framesock.ServerTLS(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())
    server = start_server(echo_caller, protocol="framed", tls=tls, proxy_protocol=True)
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(v2())
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(frame(b"secret"))
            assert json.loads(read_reply_frame(sock)[1])["address"] == ["192.0.2.1", 56324]


def test_log_lines_name_the_real_client(proxied, caplog):
    server = proxied(request_as="json")
    caplog.set_level(logging.WARNING, logger="framesock")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(v1(("203.0.113.5", 777)) + frame(b"{not json"))
        assert read_reply_frame(sock)[0]  # an error reply
    wait_until(lambda: any("203.0.113.5:777" in r.getMessage() for r in caplog.records))


def test_aio_server_takes_the_header():
    async def handler(request, caller):
        return {"address": list(caller.address)}

    async def main():
        async with aio.Server(handler, port=0, protocol="framed", proxy_protocol=True) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(v1() + frame(b"x"))
            header = await reader.readexactly(4)
            reply = json.loads(await reader.readexactly(struct.unpack(">I", header)[0]))
            writer.close()
            await writer.wait_closed()
            return reply

    assert asyncio.run(main())["address"] == ["192.0.2.1", 56324]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="proxy_from is only for proxy_protocol=True"):
        framesock.Server(port=0, proxy_from=["10.0.0.0/8"])
    with pytest.raises(ValueError, match="not an address or a CIDR range"):
        framesock.Server(port=0, proxy_protocol=True, proxy_from=["10.0.0.0/33"])
    with pytest.raises(ValueError, match="proxy_from is empty"):
        framesock.Server(port=0, proxy_protocol=True, proxy_from=[])
    with pytest.raises(TypeError):
        framesock.Server(port=0, proxy_protocol=True, proxy_from="10.0.0.0/8")


def test_the_command_line_takes_proxy_protocol_for_every_worker(tmp_path):
    from workers_support import Program

    (tmp_path / "app.py").write_text(
        "import os\n"
        "def handler(request, caller):\n"
        "    return {'address': list(caller.address), 'pid': os.getpid()}\n"
    )
    args = ["app:handler", "--port", "0", "--protocol", "framed", "--workers", "2", "--proxy-protocol"]
    server = Program([*args, "--proxy-from", "10.0.0.0/8", "--proxy-from", "127.0.0.1"], tmp_path)
    try:
        host, port = server.address()
        server.serving(2)
        for index in range(6):
            reply = exchange(port, v2(("192.0.2.8", 1000 + index)))
            assert reply["address"] == ["192.0.2.8", 1000 + index]
        refused(port, frame(b"no header"))
        server.send(2)  # SIGINT
        assert server.wait() == 0
    finally:
        server.close()
