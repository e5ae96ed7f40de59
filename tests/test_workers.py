"""framesock-server MODULE:ATTR --workers N, as a whole program: a supervisor and its workers
as subprocesses, real signals, real load (see workers_support.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import framesock
from workers_support import STOP_LIMIT, Load, Program, alive, handled, write_app

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_app(tmp_path)


@pytest.fixture
def program(app_dir: Path):
    """Factory: ``program(*args)`` runs ``framesock-server ARGS`` in the app's directory; kills it
    and its workers after the test."""
    started: list[Program] = []

    def start(*args: str, python: bool = False, wrap: list[str] | None = None) -> Program:
        started.append(Program(list(args), app_dir, python=python, wrap=wrap))
        return started[-1]

    yield start
    for running in started:
        running.close()


def serve(program, *args: str, workers: int = 2) -> tuple[Program, tuple[str, int]]:
    server = program("app:handler", "--port", "0", "--protocol", "framed", "--workers", str(workers), *args)
    address = server.address()
    server.serving(workers)
    return server, address


def test_workers_share_the_socket_and_stop_on_sigterm(program):
    server, address = serve(program)
    pids = set(server.serving(2))
    # Which worker takes a connection is the kernel's and the scheduler's choice (make bench
    # measures the spread); each reply comes from one of them.
    for _ in range(20):
        with framesock.Client(*address, protocol="framed") as client:
            reply = client.request("hello")
        assert reply["request"] == "hello"
        assert reply["pid"] in pids
    server.send(signal.SIGTERM)
    assert server.wait() == 0
    assert "stopped: " in server.log
    assert not any(alive(pid) for pid in pids)


def test_sigterm_under_load_answers_every_request_a_handler_saw(program, app_dir):
    server, address = serve(program)
    load = Load(address, clients=6, prefix="sleep 0.02 ")
    load.wait_for_replies(100)
    server.send(signal.SIGTERM)
    assert server.wait() == 0
    load.stop()
    answered = {request for request, _ in load.replies}
    seen = set(handled(app_dir))
    assert seen - answered == set(), "a handler saw these requests, their clients got no reply"
    for request, err in load.failures:
        assert request not in seen and isinstance(err, ConnectionError), (request, err)


def test_a_worker_killed_with_sigkill_is_replaced_and_the_load_goes_on(program):
    server, address = serve(program)
    load = Load(address, clients=4)
    load.wait_for_replies(100)
    victim = server.serving(2)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_for(rf"\(pid {victim}\) died \(killed by SIGKILL\)")
    server.serving(3)
    load.wait_for_replies(200)
    load.stop()
    # Only what was in flight on the killed worker may fail, and as a ConnectionError.
    assert len(load.failures) <= 4, load.failures
    for _, err in load.failures:
        assert isinstance(err, ConnectionError), err
    pids = {reply["pid"] for _, reply in load.replies[-100:]}
    assert victim not in pids
    server.send(signal.SIGTERM)
    assert server.wait() == 0


def test_sighup_replaces_every_worker_with_new_code_and_loses_no_request(program, app_dir):
    server, address = serve(program)
    old = set(server.serving(2))
    load = Load(address, clients=6)
    load.wait_for_replies(200)
    (app_dir / "version.txt").write_text("2")
    server.send(signal.SIGHUP)
    server.wait_for(r"replaced by", count=2)
    server.wait_for(r"stopped \(exit status 0\)", count=2)
    load.wait_for_replies(200)
    load.stop()
    assert load.failures == []
    late = [reply for _, reply in load.replies[-100:]]
    assert {reply["version"] for reply in late} == {"2"}
    assert not {reply["pid"] for reply in late} & old
    server.send(signal.SIGTERM)
    assert server.wait() == 0


def test_max_requests_recycles_workers_without_a_failed_request(program):
    server, address = serve(program, "--max-requests", "150")
    load = Load(address, clients=4)
    server.wait_for(r"replaced by", count=4, limit=60)
    load.stop()
    assert load.failures == []
    assert "--max-requests" in server.log
    server.send(signal.SIGTERM)
    assert server.wait() == 0


def test_an_app_that_fails_to_import_stops_the_program_with_status_3(program, app_dir):
    (app_dir / "broken.py").write_text("raise RuntimeError('no database configured')\n")
    server = program("broken:handler", "--port", "0", "--workers", "3")
    assert server.wait() == 3
    assert server.log.count("RuntimeError: no database configured") == 1, server.log
    assert "Traceback" in server.log
    for spec, says in [("missing:handler", "no module named 'missing'"), ("app:nothing", "no attribute 'nothing'")]:
        other = program(spec, "--port", "0", "--workers", "2")
        assert other.wait() == 3
        assert other.log.count(says) == 1, other.log


def test_workers_that_keep_dying_stop_the_program_with_status_4(program, app_dir):
    (app_dir / "crashing.py").write_text(
        "import os, threading\nthreading.Timer(0.2, os._exit, (1,)).start()\ndef handler(r):\n    return r\n"
    )
    server = program("crashing:handler", "--port", "0", "--workers", "2")
    assert server.wait() == 4
    assert "workers keep dying soon after starting" in server.log


def test_workers_exit_when_the_supervisor_is_killed(program):
    server, _ = serve(program)
    pids = server.serving(2)
    server.process.kill()
    server.process.wait(10)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


def test_a_second_sigterm_stops_at_once(program, app_dir):
    server, address = serve(program, "--graceful-timeout", "60")
    load = Load(address, clients=2, prefix="sleep 30 ", timeout=60)
    deadline = time.monotonic() + 20
    while len(handled(app_dir)) < 2:  # both slow requests are in their handlers
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.send(signal.SIGTERM)
    server.wait_for(r"SIGTERM: stopping")
    server.send(signal.SIGTERM)
    assert server.wait(20) == 0
    assert "stopping at once" in server.log
    load.stop()


@pytest.mark.parametrize("kind", ["ipv6", "unix", "tls", "coroutine", "static"])
def test_workers_serve_every_kind_of_socket_and_app(program, app_dir, kind, tmp_path):
    args = ["--workers", "2", "--protocol", "framed"]
    spec, client, expect = "app:handler", {}, "request"
    if kind == "ipv6":
        if not socket.has_ipv6:
            pytest.skip("no IPv6 here")
        args += ["--host", "::1", "--port", "0"]
    elif kind == "unix":
        path = str(tmp_path / "workers.sock")
        args += ["--path", path]
    elif kind == "tls":
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
        args += ["--port", "0", "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        client["tls"] = framesock.ClientTLS(ca=str(tmp_path / "ca.pem"))
    elif kind == "coroutine":
        spec, expect = "app:coroutine", "coroutine"
        args += ["--port", "0"]
    else:
        spec, expect = "app:static", "static"
        args += ["--port", "0"]
    server = program(spec, *args)
    pids = server.serving(2)
    if kind == "unix":
        target = dict(host=None, port=None, path=path)
    else:
        host, port = server.address()
        target = dict(host=host, port=port)
    with framesock.Client(target.pop("host"), target.pop("port"), protocol="framed", **target, **client) as c:
        reply = c.request("hi")
    assert expect in reply, reply
    if kind != "static":
        assert reply["pid"] in pids
    server.send(signal.SIGTERM)
    assert server.wait() == 0
    if kind == "unix":
        assert not os.path.exists(path), "the supervisor removes its socket file"


def test_the_supervisor_as_pid_1_handles_sigterm(program):
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare here")
    probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.decode().strip()}")
    server = program(
        "-m", "framesock.server", "app:handler", "--port", "0", "--workers", "2", "--protocol", "framed",
        python=True, wrap=[unshare, "--pid", "--fork", "--mount-proc", "--kill-child"],
    )  # fmt: skip
    address = server.address()
    server.serving(2)
    with framesock.Client(*address, protocol="framed") as client:
        assert client.request("from outside")["request"] == "from outside"
    # The supervisor is PID 1 of the new namespace: the child of unshare here.
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    assert len(children) == 1
    supervisor = int(children[0])
    with open(f"/proc/{supervisor}/status") as status:
        namespace_pids = status.read().split("NSpid:")[1].split("\n")[0].split()
        assert namespace_pids[-1] == "1", namespace_pids
    os.kill(supervisor, signal.SIGTERM)
    assert server.wait() == 0
    assert "SIGTERM: stopping" in server.log


@pytest.mark.parametrize(
    "args, says",
    [
        (["app"], "MODULE:ATTR"),
        (["app:handler", "--no-such-option"], "unrecognized arguments"),
        (["--workers", "2"], "needs an app"),
        (["app:handler", "--workers", "many"], "--workers"),
    ],
)
def test_a_malformed_command_line_is_one_line_and_status_2(app_dir, args, says):
    done = subprocess.run(
        [sys.executable, "-m", "framesock.server", *args], cwd=app_dir, capture_output=True, timeout=STOP_LIMIT
    )
    assert done.returncode == 2
    assert says in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


RUN_PROGRAM = """
import sys, framesock
def announce(address):
    print("framesock-server: listening on %s:%d" % address[:2], file=sys.stderr, flush=True)
app = sys.argv[1] if sys.argv[1] != "callable" else (lambda request: {"pid": 0, "request": request})
sys.exit(framesock.run(app, workers=int(sys.argv[2]), port=0, protocol="framed", ready=announce))
"""


@pytest.mark.parametrize("app, workers", [("app:handler", 2), ("callable", 1)])
def test_framesock_run_serves_until_sigterm(program, app_dir, app, workers):
    (app_dir / "runner.py").write_text(RUN_PROGRAM)
    server = program("runner.py", app, str(workers), python=True)
    address = server.address()
    if app != "callable":
        server.serving(workers)
    with framesock.Client(*address, protocol="framed") as client:
        assert client.request("via run")["request"] == "via run"
    server.send(signal.SIGTERM)
    assert server.wait() == 0


SUPERVISOR_PROGRAM = """
import os, signal, sys, threading, time
import framesock
from framesock.workers.supervisor import Supervisor

supervisor = Supervisor("app:handler", workers=2, port=0, settings={"protocol": "framed"})

def ask(address):
    with framesock.Client(*address[:2], protocol="framed") as client:
        for n in range(300):
            client.request(str(n))
    # Each worker reports its counters once a second: wait for the sum to show all 300.
    deadline = time.monotonic() + 20
    while supervisor.stats().get("requests", 0) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    print(supervisor.stats()["requests"], supervisor.stats()["workers"], flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

status = supervisor.run(ready=lambda address: threading.Thread(target=ask, args=(address,)).start())
sys.exit(status)
"""


def test_the_supervisor_sums_its_workers_counters(program, app_dir):
    (app_dir / "supervise.py").write_text(SUPERVISOR_PROGRAM)
    server = program("supervise.py", python=True)
    assert server.wait() == 0
    assert server.out == ["300 2"], server.log
    assert "stopped: 300 requests" in server.log
