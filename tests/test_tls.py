"""TLS and mutual TLS, against framesock's own peers and Python's ssl module.

Certificates are made at test time with trustme (a CA, server certificates for localhost,
127.0.0.1 and ::1, client certificates, an expired one, one for another name); no private key
is ever written to the repository.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import struct
import os
import re
import threading

import pytest
import trustme

import framesock
from conftest import PeerThread, frame, wait_until


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca):
    return ca.issue_cert("localhost", "127.0.0.1", "::1")


@pytest.fixture(scope="module")
def client_cert(ca):
    return ca.issue_cert("client.example", common_name="client one")


def server_tls(cert, **kwargs) -> framesock.ServerTLS:
    return framesock.ServerTLS(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes(), **kwargs)


def client_tls(ca, cert=None, **kwargs) -> framesock.ClientTLS:
    if cert is not None:
        kwargs.update(cert=cert.cert_chain_pems[0].bytes(), key=cert.private_key_pem.bytes())
    return framesock.ClientTLS(ca.cert_pem.bytes(), **kwargs)


@pytest.fixture
def tls_server(server_cert, start_server):
    """``start_server`` under TLS (the localhost certificate unless told otherwise), framed."""

    def start(handler=lambda r: {"echo": r}, protocol="framed", **kwargs):
        kwargs.setdefault("tls", server_tls(server_cert))
        return start_server(handler, protocol=protocol, **kwargs)

    return start


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_framesock_to_framesock(tls_server, ca, protocol):
    server = tls_server(protocol=protocol)
    with framesock.Client(*server.address[:2], protocol=protocol, tls=client_tls(ca)) as client:
        assert client.request("hello") == {"echo": "hello"}
        if protocol == "framed":
            assert client.request_many(["a", "b"]) == [{"echo": "a"}, {"echo": "b"}]


def test_start_server_and_start_client_take_tls(server_cert, ca):
    result = {}
    ready = threading.Event()
    runner = PeerThread(
        lambda: result.update(
            framesock.start_server(port=0, tls=server_tls(server_cert), ready=lambda a: (result.update(address=a), ready.set()))
        )
    )
    runner.start()
    assert ready.wait(10)
    reply = framesock.start_client(*result["address"][:2], tls=client_tls(ca))
    assert reply == {"key": "id", "val": 123}
    runner.outcome()
    assert result["request"] == "msg from client"


def python_ssl_client(port: int, ca, payload: bytes, *, framed: bool, cert=None) -> bytes:
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    if cert is not None:
        cert.configure_cert(context)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(frame(payload))
            if framed:
                header = b""
                while len(header) < 4:
                    header += sock.recv(4 - len(header))
                (length,) = struct.unpack(">I", header)
                data = b""
                while len(data) < length & 0x7FFF_FFFF:
                    data += sock.recv(65536)
                return data
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_python_ssl_client_against_framesock(tls_server, ca, protocol):
    server = tls_server(protocol=protocol)
    reply = python_ssl_client(server.address[1], ca, b"from ssl", framed=protocol == "framed")
    assert reply == b'{"echo": "from ssl"}'


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_framesock_client_against_a_python_ssl_server(server_cert, ca, protocol):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(context)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as sock:
            data = b""
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                data += sock.recv(65536)
            reply = b'{"from": "python ssl"}'
            # Classic: the reply ends with a close that sends no TLS close_notify first, as the
            # seed-style servers do; framesock reads it as the end, like Python's ssl.
            sock.sendall(struct.pack(">I", len(reply)) + reply if protocol == "framed" else reply)
            return data[4:]

    runner = PeerThread(serve)
    runner.start()
    with framesock.Client("127.0.0.1", listener.getsockname()[1], protocol=protocol, tls=client_tls(ca, server_name="localhost")) as client:
        assert client.request("x") == {"from": "python ssl"}
    assert runner.outcome() == b"x"
    listener.close()


# --- refusals ---------------------------------------------------------------------------------------


def test_unknown_ca_is_refused_on_the_client(tls_server):
    server = tls_server()
    other_ca = trustme.CA()
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(other_ca)) as client:
        with pytest.raises(framesock.TLSError, match="unknown issuer") as caught:
            client.request("x")
    assert isinstance(caught.value, ssl.SSLError)
    assert str(caught.value).startswith("the server's certificate is signed by an unknown issuer")
    wait_until(lambda: server.stats()["errors"]["tls"] == 1)


def test_wrong_server_name_is_refused(tls_server, ca):
    server = tls_server()
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, server_name="elsewhere.example")) as client:
        with pytest.raises(framesock.TLSError, match="not valid for the name"):
            client.request("x")


def test_expired_server_certificate_is_refused(tls_server, ca):
    expired = ca.issue_cert(
        "localhost", "127.0.0.1", not_after=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1),
        not_before=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30),
    )
    server = tls_server(tls=server_tls(expired))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca)) as client:
        with pytest.raises(framesock.TLSError, match="expired"):
            client.request("x")


def test_mutual_tls_accepts_a_good_client_certificate(tls_server, ca, server_cert, client_cert):
    server = tls_server(tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, client_cert)) as client:
        assert client.request("me") == {"echo": "me"}
    assert python_ssl_client(server.address[1], ca, b"ssl me", framed=True, cert=client_cert) == b'{"echo": "ssl me"}'


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_server, ca, server_cert):
    server = tls_server(tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca)) as client:
        with pytest.raises(framesock.TLSError, match="requires a client certificate"):
            client.request("x")
    wait_until(lambda: server.stats()["errors"]["tls"] == 1)


def test_mutual_tls_refuses_a_client_chain_padded_with_intermediates_unread(tls_server, ca, server_cert, caplog):
    # A valid chain through one intermediate, then the same intermediate sent 20 times more:
    # verifying would find the path, but every extra certificate costs the server work.
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("client.example")
    key = leaf.private_key_pem.bytes()
    good, padding = leaf.cert_chain_pems[0].bytes(), leaf.cert_chain_pems[1].bytes()
    server = tls_server(tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    address = server.address[:2]
    honest = framesock.ClientTLS(ca.cert_pem.bytes(), cert=good + padding, key=key)
    with framesock.Client(*address, protocol="framed", tls=honest) as client:
        assert client.request("one intermediate") == {"echo": "one intermediate"}
    padded = framesock.ClientTLS(ca.cert_pem.bytes(), cert=good + padding * 21, key=key)
    with framesock.Client(*address, protocol="framed", tls=padded) as client:
        with pytest.raises(framesock.TLSError):
            client.request("x")
    wait_until(lambda: server.stats()["errors"]["tls"] == 1)
    wait_until(lambda: "sent 21 intermediate certificates, more than the 8 accepted" in caplog.text)


def test_mutual_tls_refuses_an_unknown_client_certificate(tls_server, ca, server_cert):
    stranger = trustme.CA().issue_cert("stranger.example")
    server = tls_server(tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, stranger)) as client:
        with pytest.raises(framesock.TLSError, match="unknown CA"):
            client.request("x")
    wait_until(lambda: server.stats()["errors"]["tls"] == 1)


def test_a_plain_client_against_a_tls_server_fails_quickly_and_says_so(tls_server):
    server = tls_server()
    with framesock.Client(*server.address[:2], protocol="framed", timeout=30) as client:
        with pytest.raises(framesock.ProtocolError, match="looks like TLS"):
            client.request("x")
    with pytest.raises(framesock.ProtocolError, match="looks like TLS"):
        framesock.start_client(*server.address[:2], timeout=30)


def test_a_tls_client_against_a_plain_server_fails_quickly_and_says_so(ca):
    with framesock.Server(port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca), timeout=30) as client:
            with pytest.raises(framesock.TLSError, match="TLS"):
                client.request("x")


def test_a_silent_peer_in_the_handshake_is_bounded_by_the_timeout(tls_server):
    server = tls_server(timeout=0.3)
    with socket.create_connection(server.address[:2], timeout=10) as silent:
        wait_until(lambda: server.stats()["errors"]["tls"] == 1)
        assert silent.recv(10) == b""


def test_bad_settings_are_value_errors_naming_the_input(tmp_path, server_cert, ca):
    with pytest.raises(ValueError, match="cert"):
        framesock.ServerTLS(b"not pem", server_cert.private_key_pem.bytes())
    with pytest.raises(ValueError, match="key"):
        framesock.ServerTLS(server_cert.cert_chain_pems[0].bytes(), b"nothing here")
    other_key = trustme.CA().issue_cert("x").private_key_pem.bytes()
    with pytest.raises(ValueError, match="do not go together"):
        framesock.ServerTLS(server_cert.cert_chain_pems[0].bytes(), other_key)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match="missing.pem"):
        framesock.ClientTLS(str(missing))
    with pytest.raises(ValueError, match="cert and key"):
        framesock.ClientTLS(ca.cert_pem.bytes(), cert=server_cert.cert_chain_pems[0].bytes())


def test_settings_from_files(tmp_path, server_cert, ca, tls_server):
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    server = tls_server(tls=framesock.ServerTLS(cert_file, str(key_file)))
    with framesock.Client(*server.address[:2], protocol="framed", tls=framesock.ClientTLS(ca_file)) as client:
        assert client.request("f") == {"echo": "f"}


def test_a_path_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path, server_cert, ca):
    key = server_cert.private_key_pem.bytes()
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)  # no writer ever comes: reading it would wait forever
    huge = tmp_path / "huge.pem"
    with open(huge, "wb") as file:
        file.truncate(5 * 1024 * 1024)  # sparse: a 5 MiB file that costs no disk
    for path, words in [
        ("/dev/zero", "not a regular file"),
        (str(fifo), "not a regular file"),
        (str(tmp_path), "not a regular file"),
        (str(huge), "larger than 4 MiB"),
    ]:
        with pytest.raises(ValueError, match=f"cert \\({re.escape(path)}\\): {words}"):
            framesock.ServerTLS(path, key)
        with pytest.raises(ValueError, match=f"^ca \\({re.escape(path)}\\): {words}"):
            framesock.ClientTLS(path)
    with pytest.raises(ValueError, match="client_ca .*not a regular file"):
        framesock.ServerTLS(server_cert.cert_chain_pems[0].bytes(), key, client_ca="/dev/zero")


# --- asyncio -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["classic", "framed"])
async def test_aio_server_and_client_over_tls(server_cert, ca, client_cert, protocol):
    from framesock import aio

    async def handler(request):
        return {"async": request}

    tls = server_tls(server_cert, client_ca=ca.cert_pem.bytes())
    async with aio.Server(handler, port=0, protocol=protocol, tls=tls) as server:
        async with aio.Client(*server.address[:2], protocol=protocol, tls=client_tls(ca, client_cert)) as client:
            assert await client.request("one") == {"async": "one"}
            replies = await asyncio.gather(*(client.request(str(n)) for n in range(20)))
            assert replies == [{"async": str(n)} for n in range(20)]
        async with aio.Client(*server.address[:2], protocol=protocol, tls=client_tls(ca)) as anonymous:
            with pytest.raises((framesock.TLSError, framesock.ConnectionClosedError)):
                await anonymous.request("no certificate")


async def test_asyncio_streams_with_ssl_against_framesock(server_cert, ca):
    from framesock import aio

    async with aio.Server(lambda r: {"echo": r}, port=0, protocol="framed", tls=server_tls(server_cert)) as server:
        context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
        reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1], ssl=context, server_hostname="localhost")
        writer.write(frame(b"streams"))
        await writer.drain()
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        assert await reader.readexactly(length) == b'{"echo": "streams"}'
        writer.close()
        await writer.wait_closed()


async def test_aio_start_server_and_start_client_take_tls(server_cert, ca):
    from framesock import aio

    loop = asyncio.get_running_loop()
    address = loop.create_future()
    serving = asyncio.ensure_future(aio.start_server(port=0, tls=server_tls(server_cert), ready=address.set_result))
    reply = await aio.start_client(*(await address)[:2], tls=client_tls(ca))
    assert reply == {"key": "id", "val": 123}
    assert (await serving)["request"] == "msg from client"


# --- the command line and openssl ------------------------------------------------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def test_command_line_programs_over_mutual_tls(tmp_path, ca, server_cert, client_cert):
    files = {}
    for name, blob in [
        ("server.pem", server_cert.cert_chain_pems[0]),
        ("server.key", server_cert.private_key_pem),
        ("client.pem", client_cert.cert_chain_pems[0]),
        ("client.key", client_cert.private_key_pem),
        ("ca.pem", ca.cert_pem),
    ]:
        files[name] = str(tmp_path / name)
        blob.write_to_path(files[name])
    server = subprocess.Popen(
        [sys.executable, "-m", "framesock.server", "--port", "0", "--tls-cert", files["server.pem"],
         "--tls-key", files["server.key"], "--tls-client-ca", files["ca.pem"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        line = server.stderr.readline().decode()
        port = line.rsplit(":", 1)[1].strip()
        client = subprocess.run(
            [sys.executable, "-m", "framesock.client", "--port", port, "--tls-ca", files["ca.pem"],
             "--tls-cert", files["client.pem"], "--tls-key", files["client.key"], "--tls-server-name", "localhost"],
            capture_output=True, timeout=30,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout == b"client get json {'key': 'id', 'val': 123}\n"
        out, _ = server.communicate(timeout=30)
        assert out == b"rev client data b'msg from client'\n"
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        server.stderr.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_openssl_s_client_talks_to_a_framesock_tls_server(tmp_path, tls_server, ca):
    server = tls_server(protocol="classic")
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.address[1]}", "-CAfile", ca_file,
         "-verify_return_error", "-servername", "localhost", "-quiet"],
        input=frame(b"from openssl"), capture_output=True, timeout=30,
    )
    assert b'{"echo": "from openssl"}' in done.stdout, done.stderr


# --- who is calling --------------------------------------------------------------------------------


def test_handlers_that_take_a_second_argument_see_the_client_identity(tls_server, ca, server_cert, client_cert):
    seen = []

    def handler(request, caller):
        seen.append(caller)
        return {"subject": caller.tls_subject, "names": caller.tls_alt_names}

    server = tls_server(handler, tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, client_cert)) as client:
        reply = client.request("who am I")
    assert "CN=client one" in reply["subject"]
    assert reply["names"] == ["DNS:client.example"]
    caller = seen[0]
    assert caller.address[0] == "127.0.0.1"
    assert caller.tls_certificate.startswith(b"0")  # DER: a SEQUENCE


def test_without_tls_the_caller_has_an_address_only(tls_server):
    def handler(request, caller):
        return {"address": list(caller.address), "subject": caller.tls_subject}

    with framesock.Server(handler, port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed") as client:
            reply = client.request("x")
    assert reply["address"][0] == "127.0.0.1" and reply["subject"] is None


async def test_coroutine_handlers_get_the_caller_too(server_cert, ca, client_cert):
    from framesock import aio

    async def handler(request, caller):
        return caller.tls_subject

    tls = server_tls(server_cert, client_ca=ca.cert_pem.bytes())
    async with aio.Server(handler, port=0, protocol="framed", tls=tls) as server:
        async with aio.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, client_cert)) as client:
            assert "CN=client one" in await client.request("x")


def test_start_server_reports_the_client_identity(server_cert, ca, client_cert):
    result = {}
    ready = threading.Event()
    tls = server_tls(server_cert, client_ca=ca.cert_pem.bytes())
    runner = PeerThread(
        lambda: result.update(
            framesock.start_server(port=0, tls=tls, ready=lambda a: (result.update(address=a), ready.set()))
        )
    )
    runner.start()
    assert ready.wait(10)
    framesock.start_client(*result["address"][:2], tls=client_tls(ca, client_cert))
    runner.outcome()
    assert "CN=client one" in result["tls_subject"]
    assert result["tls_alt_names"] == ["DNS:client.example"]


def test_mutual_tls_refuses_an_expired_client_certificate(tls_server, ca, server_cert):
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert(
        "client.example", not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    server = tls_server(tls=server_tls(server_cert, client_ca=ca.cert_pem.bytes()))
    with framesock.Client(*server.address[:2], protocol="framed", tls=client_tls(ca, expired)) as client:
        with pytest.raises(framesock.TLSError, match="Expired"):
            client.request("x")
    wait_until(lambda: server.stats()["errors"]["tls"] == 1)


def test_tls_over_ipv6_checks_the_ip_address(server_cert, ca):
    try:
        server = framesock.Server(lambda r: r, host="::1", port=0, protocol="framed", tls=server_tls(server_cert))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        with framesock.Client("::1", server.address[1], protocol="framed", tls=client_tls(ca)) as client:
            assert client.request("over ipv6") == "over ipv6"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_a_framesock_client_talks_to_openssl_s_server(tmp_path, ca, server_cert):
    import os

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    server_cert.cert_chain_pems[0].write_to_path(cert)
    server_cert.private_key_pem.write_to_path(key)
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "0", "-cert", cert, "-key", key, "-naccept", "1", "-no_ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        seen = b""
        while b"ACCEPT" not in seen or not seen.split(b"ACCEPT", 1)[1].count(b"\n"):
            chunk = os.read(server.stdout.fileno(), 4096)
            assert chunk, "s_server ended before listening"
            seen += chunk
        port = int(seen.split(b"ACCEPT", 1)[1].split(b"\n", 1)[0].rsplit(b":", 1)[1])
        tls = client_tls(ca, server_name="localhost")
        client = PeerThread(lambda: framesock.start_client("127.0.0.1", port, "to openssl", tls=tls, timeout=20))
        client.start()
        while b"to openssl" not in seen:  # s_server prints what the client sent (no newline)
            chunk = os.read(server.stdout.fileno(), 4096)
            assert chunk, "s_server ended before the request"
            seen += chunk
        # What s_server reads on its stdin goes to the client; the end of stdin closes it.
        server.stdin.write(b'{"from": "openssl"}')
        server.stdin.close()
        assert client.outcome(timeout=20) == {"from": "openssl"}
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
        if not server.stdin.closed:
            server.stdin.close()


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_clients_that_close_normally_leave_no_error_and_no_log(tls_server, ca, protocol, caplog):
    # Before: every framed TLS Client closed normally was an `io` error and a WARNING
    # ("peer closed connection without sending TLS close_notify"). framesock's clients now end
    # with close_notify, and the server takes any end between requests as a clean one.
    server = tls_server(protocol=protocol)
    tls = client_tls(ca)

    async def with_aio() -> None:
        async with framesock.aio.Client(*server.address[:2], protocol=protocol, tls=tls) as client:
            assert await client.request("aio") == {"echo": "aio"}

    with caplog.at_level(logging.DEBUG, logger="framesock"):
        for _ in range(3):
            with framesock.Client(*server.address[:2], protocol=protocol, tls=tls) as client:
                assert client.request("blocking") == {"echo": "blocking"}
            asyncio.run(with_aio())
        wait_until(lambda: server.stats()["connections_active"] == 0)
    stats = server.stats()
    assert stats["requests"] == 6
    assert not any(stats["errors"].values()), stats["errors"]
    assert [r.getMessage() for r in caplog.records if r.name == "framesock"] == []


@pytest.mark.parametrize("protocol", ["classic", "framed"])
def test_tcp_checks_on_a_tls_port_are_empty_connections_not_tls_errors(tls_server, protocol, caplog):
    # A balancer's TCP check connects and closes (some end it with a reset) without a
    # ClientHello: counted in connections_empty, never as a failed handshake, and not logged.
    server = tls_server(protocol=protocol)
    with caplog.at_level(logging.DEBUG, logger="framesock"):
        for index in range(20):
            probe = socket.create_connection(server.address[:2], timeout=5)
            if index % 2:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            probe.close()
        wait_until(lambda: server.stats()["connections_empty"] == 20)
    assert not any(server.stats()["errors"].values()), server.stats()["errors"]
    assert [r.getMessage() for r in caplog.records if r.name == "framesock"] == []
