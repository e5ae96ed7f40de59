"""A real deployment across hosts: HAProxy (TCP mode, leastconn, HTTP checks on /healthz,
send-proxy-v2) in front of three framesock hosts, each ``--workers 2 --proxy-protocol``, under a
load of framed clients and tutorial-style plain-socket clients from a client host.

The hosts are network namespaces made here, on one bridge, with addresses (10.0.0.0/24) that
exist only inside them; the HAProxy configuration is the README's, word for word (only its
stats socket's path differs). Everything is torn down at the end, also when the test fails.
Skipped, with the reason, only where HAProxy is missing or namespaces cannot be made (not
root); ``make test`` installs HAProxy.

The phases: (a) every reply correct, and handlers see the client host's address; (b) one
backend killed with SIGKILL: requests marked idempotent all succeed, the others fail only if
they were in flight there, and HAProxy marks it down; (c) another drained with SIGTERM: no
failed request and no retry; (d) the third restarted with SIGHUP, worker by worker: no failed
request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from workers_support import Program

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve().parent
README = (HERE.parent / "README.md").read_text()
LOAD = HERE / "balancer_load.py"
BALANCER, CLIENT = "10.0.0.1", "10.0.0.2"
BACKENDS = {"b1": "10.0.0.11", "b2": "10.0.0.12", "b3": "10.0.0.13"}

APP = """
import os
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = open(os.path.join(HERE, "name.txt")).read().strip()

def handler(request, caller):
    return {"backend": NAME, "pid": os.getpid(), "client": caller.address[0], "request": request}
"""


def haproxy_config(socket_path: str) -> str:
    block = re.search(r"^```text\n# haproxy\.cfg\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
    assert block, "the README's haproxy.cfg block is missing"
    config = block[1]
    assert "/run/haproxy/framesock.sock" in config
    return config.replace("/run/haproxy/framesock.sock", socket_path)


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class Network:
    """A client host, a balancer host and three backend hosts: network namespaces whose veth
    ends meet on a bridge in the balancer's namespace."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.balancer = f"fs-{tag}-lb"
        self.hosts = {"client": f"fs-{tag}-c", **{name: f"fs-{tag}-{name}" for name in BACKENDS}}
        self.made: list[str] = []

    def build(self) -> None:
        for namespace in (self.balancer, *self.hosts.values()):
            run("ip", "netns", "add", namespace)
            self.made.append(namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", self.balancer, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.balancer, "addr", "add", f"{BALANCER}/24", "dev", "br0")
        run("ip", "-n", self.balancer, "link", "set", "br0", "up")
        addresses = {"client": CLIENT, **BACKENDS}
        for index, (name, namespace) in enumerate(self.hosts.items()):
            outer, inner = f"fs{self.tag}{index}a", f"fs{self.tag}{index}b"
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", outer, "netns", self.balancer)
            run("ip", "link", "set", inner, "netns", namespace)
            run("ip", "-n", self.balancer, "link", "set", outer, "master", "br0", "up")
            run("ip", "-n", namespace, "addr", "add", f"{addresses[name]}/24", "dev", inner)
            run("ip", "-n", namespace, "link", "set", inner, "up")

    def wrap(self, host: str) -> list[str]:
        namespace = self.balancer if host == "balancer" else self.hosts[host]
        return ["ip", "netns", "exec", namespace]

    def tear_down(self) -> None:
        for namespace in self.made:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def can_build_networks() -> str | None:
    """Why this machine cannot run the test, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (make test installs it with apt-get where it can)"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"fs-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be made here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def server_states(stats_socket: str) -> dict[str, str]:
    """HAProxy's view: ``{"b1": "UP", ...}`` from its stats socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(stats_socket)
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "framesock" and row.get("svname") in BACKENDS:
            states[row["svname"]] = row["status"]
    return states


def wait_for(condition, limit: float, what: str) -> float:
    """Polls ``condition`` until it holds; returns how long it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit, f"not within {limit} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


class Load:
    """balancer_load.py on the client host until ``finish()``; then its summary."""

    def __init__(self, network: Network, folder: Path, name: str, spec: dict) -> None:
        self.stop_file = folder / f"stop-{name}"
        spec = dict(spec, client=CLIENT)
        args = [str(LOAD), BALANCER, "9000", str(self.stop_file), json.dumps(spec)]
        self.program = Program(args, folder, python=True, wrap=network.wrap("client"))

    def replies(self) -> int:
        found = re.findall(r"progress (\d+)", self.program.log)
        return int(found[-1]) if found else 0

    def wait_replies(self, more: int, limit: float = 60) -> None:
        start = self.replies()
        self.program.wait_for(r"progress", 1, limit)
        wait_for(lambda: self.replies() >= start + more, limit, f"{more} more replies")

    def finish(self) -> dict:
        self.stop_file.touch()
        assert self.program.wait(90) == 0, self.program.log[-3000:]
        summary = json.loads("\n".join(self.program.out))
        self.program.close()
        return summary


def test_haproxy_in_front_of_three_hosts(tmp_path):
    why_not = can_build_networks()
    if why_not:
        print(f"skipped: {why_not}")
        pytest.skip(why_not)
    network = Network()
    programs: list[Program] = []
    try:
        network.build()
        backends = {}
        for name, address in BACKENDS.items():
            folder = tmp_path / name
            folder.mkdir()
            (folder / "app.py").write_text(APP)
            (folder / "name.txt").write_text(name)
            args = [
                "app:handler", "--workers", "2", "--protocol", "framed", "--host", address, "--port", "9000",
                "--proxy-protocol", "--proxy-from", BALANCER, "--health", f"{address}:9100",
                "--drain-delay", "3", "--graceful-timeout", "10",
            ]  # fmt: skip
            backends[name] = Program(args, folder, wrap=network.wrap(name))
            programs.append(backends[name])
        for backend in backends.values():
            backend.serving(2)
        stats_socket = str(tmp_path / "haproxy.sock")
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(stats_socket))
        haproxy = shutil.which("haproxy") or "haproxy"
        balancer = Program(["-db", "-f", str(tmp_path / "haproxy.cfg")], tmp_path, wrap=network.wrap("balancer"), exe=haproxy)
        programs.append(balancer)
        wait_for(lambda: os.path.exists(stats_socket) and set(server_states(stats_socket).values()) == {"UP"}, 30, "every backend UP")

        # (a) and (b): a mixed load; b1 killed under it.
        spec = {
            "groups": [
                {"name": "idempotent", "threads": 4, "retries": 5, "idempotent": True},
                {"name": "plain", "threads": 4, "retries": 0, "idempotent": False},
            ],
            "tutorial": 2,
        }
        load = Load(network, tmp_path, "killed", spec)
        load.wait_replies(300)
        b1 = backends["b1"]
        victims = [b1.process.pid, *b1.worker_pids()]
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        down_after = wait_for(lambda: server_states(stats_socket)["b1"].startswith("DOWN"), 30, "b1 marked DOWN")
        load.wait_replies(300)
        killed = load.finish()
        print("(a)/(b) SIGKILL of b1:", json.dumps(killed), f"b1 DOWN after {down_after:.2f} s", flush=True)
        assert killed["wrong"] == []
        assert killed["replies"]["idempotent"] > 0 and killed["replies"]["plain"] > 0 and killed["replies"]["tutorial"] > 0
        assert not [cause for cause in killed["failures"] if cause.startswith("idempotent")], killed["failures"]
        # At most the requests in flight on b1: one per plain thread and tutorial thread.
        assert sum(count for cause, count in killed["failures"].items()) <= 4 + 2, killed["failures"]
        assert time.monotonic() - killed_at < 60

        # (c): b2 drained with SIGTERM under a load that never retries.
        never_retry = {"groups": [{"name": "plain", "threads": 6, "retries": 0, "idempotent": False}], "tutorial": 2}
        load = Load(network, tmp_path, "drained", never_retry)
        load.wait_replies(300)
        backends["b2"].send(signal.SIGTERM)
        wait_for(lambda: server_states(stats_socket)["b2"].startswith("DOWN"), 30, "b2 marked DOWN by its check")
        assert backends["b2"].wait(60) == 0
        load.wait_replies(300)
        drained = load.finish()
        print("(c) SIGTERM of b2:", json.dumps(drained), flush=True)
        assert drained["wrong"] == [] and drained["failures"] == {}, drained
        assert drained["replies"]["plain retries"] == 0

        # (d): b3, the last one, restarted worker by worker with SIGHUP.
        load = Load(network, tmp_path, "restarted", never_retry)
        load.wait_replies(300)
        b3 = backends["b3"]
        b3.send(signal.SIGHUP)
        b3.wait_for(r"replaced by", 2, 60)
        b3.wait_for(r"stopped \(exit status 0\)", 2, 60)
        load.wait_replies(300)
        restarted = load.finish()
        print("(d) SIGHUP of b3:", json.dumps(restarted), flush=True)
        assert restarted["wrong"] == [] and restarted["failures"] == {}, restarted
        assert restarted["backends"] == {"b3": sum(v for k, v in restarted["replies"].items() if not k.endswith("retries"))}
    finally:
        for program in programs:
            program.close()
        network.tear_down()
