"""What users see of the objects themselves: the typed example program runs, every public object
has a readable repr, the commands say their version, and host/port/path work for every kind of
address (the typing of all this is checked by ``make lint``)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

import framesock
from framesock import aio

EXAMPLE = Path(__file__).parent / "typed_example.py"


def test_typed_example_program_runs(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = [tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"]
    ca.cert_pem.write_to_path(str(files[0]))
    cert.cert_chain_pems[0].write_to_path(str(files[1]))
    cert.private_key_pem.write_to_path(str(files[2]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "typed example: ok\n"


def test_submodules_are_attributes_of_the_package_and_importing_starts_nothing():
    program = (
        "import os, threading, framesock\n"
        "assert framesock.aio.Server and framesock.types.Reply\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert len(os.listdir('/proc/self/task')) == 1, 'an engine thread was started'\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", ["framesock.server", "framesock.client"])
def test_commands_say_their_version(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0
    assert done.stdout == f"framesock-{module.split('.')[1]} {framesock.__version__}\n"


def test_host_port_path_for_ipv4_ipv6_and_unix(tmp_path):
    unix_path = str(tmp_path / "s.sock")
    for kwargs, host, path in [
        ({"host": "127.0.0.1", "port": 0}, "127.0.0.1", None),
        ({"host": "::1", "port": 0}, "::1", None),
        ({"path": unix_path}, None, unix_path),
    ]:
        with framesock.Server(protocol="framed", **kwargs) as server:
            assert (server.host, server.path) == (host, path)
            assert (server.port is None) == (path is not None)
            # One line for every kind of server.
            with framesock.Client(server.host, server.port, path=server.path, protocol="framed") as client:
                assert client.request("x") == {"key": "id", "val": 123}


def test_a_client_without_host_or_port_needs_a_path():
    with pytest.raises(TypeError, match="host and port"):
        framesock.Client(None, 8000)
    with pytest.raises(TypeError, match="host and port"):
        framesock.start_client("127.0.0.1", None)


def test_every_public_object_has_a_readable_repr(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_tls = framesock.ServerTLS(cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())
    client_tls = framesock.ClientTLS(ca.cert_pem.bytes(), server_name="localhost")
    assert repr(server_tls) == "<framesock.ServerTLS requires_client_certificate=False>"
    assert repr(client_tls) == "<framesock.ClientTLS server_name='localhost'>"
    callers: list[str] = []

    def handler(request, caller):
        callers.append(repr(caller))
        return 1

    with framesock.Server(handler, port=0, protocol="framed") as server:
        assert repr(server) == f"<framesock.Server 127.0.0.1:{server.port} protocol='framed'>"
        client = framesock.Client(server.host, server.port, protocol="framed")
        assert repr(client) == f"<framesock.Client 127.0.0.1:{server.port} protocol='framed'>"
        client.request("x")
        client.close()
        assert repr(client).endswith(" closed>")
    assert callers and callers[0].startswith("<framesock.Caller 127.0.0.1:")

    async def main() -> None:
        async with aio.Server(port=0) as server:
            assert repr(server) == f"<framesock.aio.Server 127.0.0.1:{server.port} protocol='classic'>"
            client = aio.Client(server.host, server.port)
            assert repr(client) == f"<framesock.aio.Client 127.0.0.1:{server.port} protocol='classic'>"
            await client.close()
            assert repr(client).endswith(" closed>")

    asyncio.run(main())
