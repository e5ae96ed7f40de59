"""The health and metrics endpoint (framesock.health, framesock.metrics) and the drain: what a
balancer, a Kubernetes probe and Prometheus see, also from hostile HTTP peers."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import framesock
from framesock import health, metrics
from conftest import frame, read_reply_frame, wait_until


def get(address, path: str, method: str = "GET") -> tuple[int, str, dict]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        connection.close()


def samples(text: str) -> dict:
    """``{(name, labels as sorted tuple): value}`` from a Prometheus text, parsed by
    prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
def served(start_server):
    """A framed echo server with a health endpoint beside it."""
    endpoints = []

    def start(**kwargs):
        server = start_server(lambda r: {"echo": r}, protocol="framed", **kwargs)
        endpoints.append(health.HealthEndpoint(server))
        return server, endpoints[-1].address

    yield start
    for endpoint in endpoints:
        endpoint.close()


def test_healthz_is_ok_while_serving_and_503_from_the_drain_on(served):
    server, address = served()
    assert get(address, "/healthz")[:2] == (200, "ok\n")
    server.drain()
    assert server.draining
    assert get(address, "/healthz")[:2] == (503, "draining\n")
    with framesock.Client(*server.address, protocol="framed") as client:
        assert client.request("still served") == {"echo": "still served"}


def test_metrics_parse_and_match_stats(served):
    server, address = served(request_as="json")
    with framesock.Client(*server.address, protocol="framed") as client:
        for index in range(7):
            client.request(index)
        with pytest.raises(framesock.RemoteError):
            client.request(b"{not json")
    status, text, headers = get(address, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(text)
    stats = server.stats()
    assert found[("framesock_requests_total", ())] == stats["requests"] == 8
    assert found[("framesock_errors_total", (("kind", "bad_request"),))] == 1
    assert found[("framesock_errors_total", (("kind", "proxy"),))] == 0
    assert found[("framesock_connections_active", ())] in (0, 1)  # the client may have closed
    assert found[("framesock_request_duration_seconds_count", ())] == 8
    assert found[("framesock_request_duration_seconds_bucket", (("le", "+Inf"),))] == 8
    assert found[("framesock_request_duration_seconds_bucket", (("le", "10.0"),))] == 8
    assert 0 < found[("framesock_request_duration_seconds_sum", ())] < 80
    bounds = [float(labels[0][1]) for name, labels in found if name.endswith("_bucket")]
    assert min(bounds) == 0.0001 and len(bounds) == 17
    assert metrics.text(server).startswith("# HELP framesock_")


def test_handler_calls_running_and_waiting_are_gauges(start_server):
    release = threading.Event()
    server = start_server(lambda r: release.wait(10) and {"r": r}, protocol="framed", handler_threads=1)
    try:
        clients = [framesock.Client(*server.address, protocol="framed") for _ in range(3)]
        threads = [threading.Thread(target=c.request, args=("x",)) for c in clients]
        for thread in threads:
            thread.start()
        wait_until(lambda: server.stats()["requests_in_progress"] == 3)
        # The one handler thread takes its call once it has started (on demand).
        wait_until(lambda: samples(metrics.text(server))[("framesock_handler_calls_waiting", ())] == 2)
        found = samples(metrics.text(server))
        assert found[("framesock_handler_calls_running", ())] == 1
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
        for client in clients:
            client.close()
    wait_until(lambda: server.stats()["requests_in_progress"] == 0)


def test_prometheus_client_collector(served):
    server, _ = served()
    with framesock.Client(*server.address, protocol="framed") as client:
        client.request("a")
    registry = CollectorRegistry()
    registry.register(metrics.Collector(server))
    exposed = generate_latest(registry).decode()
    assert "framesock_requests_total 1.0" in exposed
    assert 'framesock_request_duration_seconds_bucket{le="+Inf"} 1.0' in exposed


def test_anything_else_is_404_405_or_400(served):
    _, address = served()
    assert get(address, "/")[0] == 404
    assert get(address, "/healthz/x")[0] == 404
    assert get(address, "/metrics?name[]=x")[0] == 200
    status, body, headers = get(address, "/healthz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, body, headers = get(address, "/healthz", method="HEAD")
    assert status == 200 and body == "" and headers["Content-Length"] == "3"
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"garbage\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET /" + b"a" * 10000)
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")


def test_slow_and_silent_peers_cost_only_their_connections(served):
    _, address = served()
    # More silent connections than the endpoint keeps at once, and one that sends half a
    # request and stops: every probe meanwhile is still answered.
    idle = [socket.create_connection(address, timeout=10) for _ in range(health.MAX_CONNECTIONS + 20)]
    try:
        idle[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost:")
        for _ in range(5):
            assert get(address, "/healthz")[0] == 200
        # The oldest of them were closed to make room.
        idle[0].settimeout(10)
        assert idle[0].recv(10) == b""
    finally:
        for sock in idle:
            sock.close()


def test_shutdown_tells_a_client_that_pipelines_without_pause(start_server):
    """A drain is a state of each connection: one whose client never stops sending is told
    (the closing handshake) once the requests it has are answered, rather than cut when the
    grace ends. Every reply before the goodbye answers a request, in order."""
    server = start_server(lambda r: {"echo": r}, protocol="framed")
    sock = socket.create_connection(server.address, timeout=20)
    stop_sending = threading.Event()

    def send_forever():
        index = 0
        try:
            while not stop_sending.is_set() and index < 2_000_000:
                sock.sendall(b"".join(frame(str(index + i).encode()) for i in range(50)))
                index += 50
        except OSError:
            pass

    sender = threading.Thread(target=send_forever)
    sender.start()
    try:
        for expected in range(200):
            is_error, payload = read_reply_frame(sock)
            assert not is_error and json.loads(payload) == {"echo": str(expected)}
        stopper = threading.Thread(target=server.shutdown, kwargs={"timeout": 60})
        stopper.start()
        replies = 200
        while True:
            is_error, payload = read_reply_frame(sock)
            if is_error:
                assert json.loads(payload)["error"] == "closing"
                break
            assert json.loads(payload) == {"echo": str(replies)}
            replies += 1
        stopper.join(60)
        assert not stopper.is_alive()
        assert server.stats()["errors"]["timeout"] == 0
    finally:
        stop_sending.set()
        sock.close()
        sender.join(20)


def test_aio_server_drains_too():
    import asyncio

    async def main():
        async with framesock.aio.Server(lambda r: r, port=0, protocol="framed") as server:
            with health.HealthEndpoint(server) as endpoint:
                before = await asyncio.to_thread(get, endpoint.address, "/healthz")
                server.drain()
                after = await asyncio.to_thread(get, endpoint.address, "/healthz")
                return before[0], after[0], server.draining

    assert asyncio.run(main()) == (200, 503, True)


def test_health_addresses_are_checked():
    assert health.parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert health.parse_address("[::1]:9100") == ("::1", 9100)
    assert health.parse_address(":9100") == ("0.0.0.0", 9100)
    for bad in ("9100", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            health.parse_address(bad)


def test_per_worker_series_are_apart_from_the_sum():
    stats = {"requests": 5, "errors": {"io": 1}, "request_duration_seconds": {"buckets": {"0.1": 5, "+Inf": 5}, "count": 5, "sum": 0.5}}
    text = metrics.render(stats, {"0": {"requests": 2}, "1": {"requests": 3}}, workers=2)
    found = samples(text)
    assert found[("framesock_requests_total", ())] == 5
    assert found[("framesock_worker_requests_total", (("worker", "0"),))] == 2
    assert found[("framesock_worker_requests_total", (("worker", "1"),))] == 3
    assert found[("framesock_workers", ())] == 2


@pytest.mark.timeout(120)
def test_the_supervisor_serves_health_and_metrics_for_its_workers(tmp_path):
    import signal
    import re

    from workers_support import Program, write_app

    write_app(tmp_path)
    args = ["app:handler", "--port", "0", "--protocol", "framed", "--workers", "2"]
    server = Program([*args, "--health", "127.0.0.1:0", "--drain-delay", "30"], tmp_path)
    try:
        address = server.address()
        pids = server.serving(2)
        found = server.wait_for(r"health and metrics on http://127\.0\.0\.1:(\d+)/healthz")[0]
        endpoint = ("127.0.0.1", int(found[1]))
        assert get(endpoint, "/healthz")[:2] == (200, "ok\n")
        with framesock.Client(*address, protocol="framed") as client:
            for index in range(20):
                client.request(f"r{index}")

        def total(name, labels=()):
            return samples(get(endpoint, "/metrics")[1]).get((name, labels), 0)

        wait_until(lambda: total("framesock_requests_total") == 20)
        assert total("framesock_workers") == 2
        per_worker = total("framesock_worker_requests_total", (("worker", "0"),)) + total(
            "framesock_worker_requests_total", (("worker", "1"),)
        )
        assert per_worker == 20
        # A worker killed: its counts stay in the sum.
        import os

        os.kill(pids[0], signal.SIGKILL)
        server.wait_for(r"\(pid \d+\) serving", 3)
        assert total("framesock_requests_total") == 20
        # SIGTERM with a drain delay: /healthz fails while the workers still serve.
        server.send(signal.SIGTERM)
        wait_until(lambda: get(endpoint, "/healthz")[0] == 503)
        with framesock.Client(*address, protocol="framed") as client:
            assert client.request("during the drain")["request"] == "during the drain"
        server.send(signal.SIGINT)  # the rest of the delay skipped
        assert server.wait() == 0
        assert re.search(r"SIGTERM: draining", server.log)
    finally:
        server.close()


@pytest.mark.timeout(120)
def test_run_in_process_drains_before_it_stops(tmp_path):
    import signal

    from workers_support import Program

    (tmp_path / "main.py").write_text(
        "import framesock\n"
        "def handler(request):\n"
        "    return {'request': request}\n"
        "raise SystemExit(framesock.run(handler, port=0, protocol='framed', health='127.0.0.1:0', drain_delay=30,\n"
        "    ready=lambda a: print(f'framesock-server: listening on {a[0]}:{a[1]}', flush=True, file=__import__('sys').stderr)))\n"
    )
    program = Program(["main.py"], tmp_path, python=True)
    try:
        address = program.address()
        found = program.wait_for(r"health and metrics on http://127\.0\.0\.1:(\d+)/healthz")[0]
        endpoint = ("127.0.0.1", int(found[1]))
        assert get(endpoint, "/healthz")[0] == 200
        program.send(signal.SIGTERM)
        wait_until(lambda: get(endpoint, "/healthz")[0] == 503)
        with framesock.Client(*address, protocol="framed") as client:
            assert client.request("draining") == {"request": "draining"}
        program.send(signal.SIGINT)
        assert program.wait() == 0
    finally:
        program.close()
