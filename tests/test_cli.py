"""The command-line programs: the seed's output byte for byte, options, and one-line errors."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SEED_MESSAGE, frame, raw_exchange, seed_style_client, seed_style_server

BIN = Path(sys.executable).parent
SERVER_COMMANDS = [[sys.executable, "-m", "framesock.server"], [str(BIN / "framesock-server")]]
CLIENT_COMMANDS = [[sys.executable, "-m", "framesock.client"], [str(BIN / "framesock-client")]]


def start_server_process(command: list[str], *args: str) -> tuple[subprocess.Popen, int]:
    """Starts a server program on port 0; returns it and the port it announced on stderr."""
    proc = subprocess.Popen(
        [*command, "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    line = proc.stderr.readline().decode()
    found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise AssertionError(f"no listening line: {line!r}")
    return proc, int(found.group(1))


@pytest.mark.parametrize("command", SERVER_COMMANDS, ids=["module", "script"])
def test_server_prints_the_seeds_line(command):
    proc, port = start_server_process(command)
    try:
        assert seed_style_client(port) == {"key": "id", "val": 123}
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out == b"rev client data b'msg from client'\n"


def test_server_prints_any_payload_as_its_bytes_repr():
    proc, port = start_server_process(SERVER_COMMANDS[0])
    try:
        raw_exchange(port, frame(b"\xffq'uote\n"))
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert out == b"rev client data " + repr(b"\xffq'uote\n").encode() + b"\n"


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=["module", "script"])
def test_client_prints_the_seeds_line(command, raw_server):
    server = raw_server(seed_style_server)
    done = subprocess.run([*command, "--port", str(server.port)], capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"client get json {'key': 'id', 'val': 123}\n"
    assert server.thread.outcome() == SEED_MESSAGE


def test_client_message_option(raw_server):
    server = raw_server(seed_style_server)
    done = subprocess.run(
        [*CLIENT_COMMANDS[0], "--port", str(server.port), "--message", "héllo"],
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0
    assert server.thread.outcome() == "héllo".encode()


def test_server_and_client_programs_together():
    server, port = start_server_process(SERVER_COMMANDS[1], "--timeout", "5")
    try:
        client = subprocess.run(
            [*CLIENT_COMMANDS[1], "--port", str(port), "--timeout", "5"], capture_output=True, timeout=20
        )
        out, _ = server.communicate(timeout=10)
    finally:
        server.kill()
    assert out == b"rev client data b'msg from client'\n"
    assert client.stdout == b"client get json {'key': 'id', 'val': 123}\n"


def test_client_error_is_one_line_and_nonzero():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: refused
        done = subprocess.run(
            [*CLIENT_COMMANDS[0], "--port", str(probe.getsockname()[1])], capture_output=True, timeout=20
        )
    assert done.returncode != 0
    assert done.stdout == b""
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "ConnectionRefusedError" in lines[0]
    assert "Traceback" not in done.stderr.decode()


def test_server_error_is_one_line_and_nonzero():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        done = subprocess.run(
            [*SERVER_COMMANDS[0], "--port", str(holder.getsockname()[1])], capture_output=True, timeout=20
        )
    assert done.returncode != 0
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert "Address already in use" in done.stderr.decode()


def test_bad_option_value_exits_nonzero():
    done = subprocess.run([*CLIENT_COMMANDS[0], "--port", "99999"], capture_output=True, timeout=20)
    assert done.returncode != 0
    assert "port" in done.stderr.decode() and "Traceback" not in done.stderr.decode()


@pytest.mark.parametrize("command", [SERVER_COMMANDS[0], CLIENT_COMMANDS[0]], ids=["server", "client"])
def test_help(command):
    done = subprocess.run([*command, "--help"], capture_output=True, timeout=20)
    assert done.returncode == 0
    for option in ("--host", "--port", "--timeout"):
        assert option.encode() in done.stdout
