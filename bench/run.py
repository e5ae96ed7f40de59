"""framesock's benchmark: framesock and its peers on the same workloads, in one run.

Prints one table (rate, p50/p99 latency, and framesock's rate divided by each peer's), checks
the targets, and writes bench/RESULTS.md and bench/results.png. Servers run in their own
processes; the concurrent workloads are driven by the Rust load generator (bench/native), so the
client is never the bottleneck. This machine is shared and noisy: read the ratios, not the
absolute numbers. BENCH_SECONDS sets the length of each measurement (default 2); the concurrent
workloads measure every peer BENCH_ROUNDS times (default 5), in turns, and report the median
round, so a dip that hits one peer's only sample cannot decide a ratio; their ratios are the
median of each round's ratio (peers measured back to back), not the ratio of two medians. The
coroutine-handler rows take at least STEADY_ROUNDS rounds: their peers' rates spread the widest
from round to round (a uvloop server read 32.6k-51.9k req/s in one run's five).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import framesock

HERE = Path(__file__).resolve().parent
FSBENCH = HERE / "native" / "target" / "release" / "fsbench"
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
# The interpreters the aio rows' servers run on, one set of rows each (framesock from this checkout
# is put on their path; each needs uvloop), separated by spaces: e.g.
# BENCH_PYTHON="/tmp/venv311/bin/python /tmp/venv312/bin/python" make bench
BENCH_PYTHONS = os.environ.get("BENCH_PYTHON", sys.executable).split()
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
STEADY_ROUNDS = 9
CONNECTIONS = 32


@dataclass
class Row:
    workload: str
    peer: str
    rate: float  # per second, in `unit`
    unit: str = "req/s"
    p50_us: float | None = None
    p99_us: float | None = None
    note: str = ""


ROWS: list[Row] = []
# Every round's rate of each peer measured in rounds, in order, by (workload, peer): a target
# compares two such peers round by round (see `achieved`).
ROUND_RATES: dict[tuple[str, str], list[float]] = {}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def server(
    peer: str,
    protocol: str,
    reply: str = "static",
    reply_file: str | None = None,
    threads: int | None = None,
    loop: str = "asyncio",
    tls: tuple[str, str] | None = None,
    processes: int = 1,
    proxy_protocol: bool = False,
    python: str = sys.executable,
):
    """Starts a peer server process and yields its port; stops it afterwards. ``tls`` is a
    (certificate, key) pair of PEM files to serve TLS with."""
    if peer == "native":
        command = [str(FSBENCH), "server", "--protocol", protocol]
        if reply_file:
            command += ["--reply-file", reply_file]
        if threads:
            command += ["--threads", str(threads)]
    else:
        command = [python, str(HERE / "peers.py"), peer, "--protocol", protocol, "--reply", reply, "--loop", loop]
        if reply_file:
            command += ["--reply-size", str(Path(reply_file).stat().st_size)]
        if tls:
            command += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        if processes > 1:
            command += ["--processes", str(processes)]
        if proxy_protocol:
            command += ["--proxy-protocol"]
    package = str(Path(framesock.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=package) if python != sys.executable else None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        line = proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{peer} did not start: {line!r}")
        port = int(line.split()[1])
        time.sleep(0.2)
        yield port
    finally:
        stop(proc, grace=5)


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if `proc` is still there after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def workers_server(workers: int, app: str = "peers:handler"):
    """``framesock-server APP --workers N`` on a free port; yields (port, log lines). Each
    worker's last log line gives its counters: see `connections_per_worker`."""
    import threading

    command = [
        sys.executable, "-m", "framesock.server", app, "--workers", str(workers), "--protocol", "framed",
        "--port", "0", "--app-dir", str(HERE), "--max-connections", "4096",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port = None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    try:
        while sum("serving" in line for line in lines) < workers:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("framesock-server did not start:\n" + "".join(lines))
            lines.append(line)
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1])
        reader.start()
        yield port, lines
    finally:
        stop(proc, grace=30)
        if reader.is_alive():
            reader.join(5)


def connections_per_worker(lines: list[str]) -> list[int]:
    """How many connections each worker accepted, from its last log line."""
    return sorted((int(line.split(" requests on ")[1].split()[0]) for line in lines if "[worker" in line and " requests on " in line), reverse=True)


def loadgen(*args: str) -> dict:
    done = subprocess.run([str(FSBENCH), *args], capture_output=True, check=True, timeout=SECONDS * 10 + 60)
    return json.loads(done.stdout)


def load_row(
    workload: str,
    peer: str,
    port: int,
    protocol: str,
    connections: int = CONNECTIONS,
    threads: int | None = None,
    extra: tuple[str, ...] = (),
) -> None:
    args = ["load", "--port", str(port), "--protocol", protocol, "--connections", str(connections), "--seconds", str(SECONDS)]
    if threads:
        args += ["--threads", str(threads)]
    result = loadgen(*args, *extra)
    note = f"{result['errors']} errors" if result["errors"] else ""
    ROWS.append(Row(workload, peer, result["rate"], "req/s", result["p50_us"], result["p99_us"], note))
    say(f"  {workload} / {peer}: {result['rate']:.0f} req/s {note}")


def load_rows_in_rounds(workload: str, protocol: str, peers: list[tuple[str, dict]], rounds: int = ROUNDS) -> None:
    """Measures each `(label, server arguments)` peer with the load generator, in `rounds`
    rounds (see `in_rounds`)."""

    def every_peer() -> None:
        for label, arguments in peers:
            with server(protocol=protocol, **arguments) as port:
                load_row(workload, label, port, protocol)

    in_rounds(every_peer, rounds)


def in_rounds(measure_every_peer, rounds: int = ROUNDS) -> None:
    """Runs `measure_every_peer` (which adds one row per peer) `rounds` times, so peers take
    turns, and keeps each peer's median row with the range of its rates in the note: the
    machine drifts by more than the differences being measured, and one sample per peer let a
    single dip decide a ratio."""
    first = len(ROWS)
    for _ in range(rounds):
        measure_every_peer()
    runs: dict[tuple[str, str], list[Row]] = {}
    for row in ROWS[first:]:
        runs.setdefault((row.workload, row.peer), []).append(row)
    del ROWS[first:]
    for key, rows in runs.items():
        ROUND_RATES[key] = [row.rate for row in rows]
        rows.sort(key=lambda row: row.rate)
        median = rows[len(rows) // 2]
        if len(rows) > 1:
            low, high = rows[0].rate, rows[-1].rate
            if rows[0].unit == "GB/s":
                spread = f"median of {len(rows)}: {low:.2f}-{high:.2f}"
            else:
                spread = f"median of {len(rows)}: {short_rate(low)}-{short_rate(high)}"
            median.note = f"{spread}; {median.note}" if median.note else spread
        ROWS.append(median)


def short_rate(rate: float) -> str:
    """A rate for a row's note: 45.2k, 571, 3.4."""
    if rate >= 1000:
        return f"{rate / 1000:.1f}k"
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"


def timed_row(workload: str, peer: str, call, unit: str = "req/s", per_call: int = 1) -> None:
    """Calls `call` repeatedly for SECONDS (after a short warm-up), recording each call's time."""
    warm_until = time.perf_counter() + min(0.3, SECONDS / 4)
    while time.perf_counter() < warm_until:
        call()
    latencies = []
    end = time.perf_counter() + SECONDS
    while (now := time.perf_counter()) < end:
        call()
        latencies.append(time.perf_counter() - now)
    latencies.sort()
    total = sum(latencies)
    rate = len(latencies) * per_call / total
    p50 = latencies[len(latencies) // 2] * 1e6
    p99 = latencies[int((len(latencies) - 1) * 0.99)] * 1e6
    ROWS.append(Row(workload, peer, rate, unit, p50, p99))
    say(f"  {workload} / {peer}: {rate:.0f} {unit}")


# --- plain-socket Python clients for the Python-side rows ------------------------------------------


class SocketClient:
    """A careful framed client in pure Python: sendall, then read the whole reply frame."""

    def __init__(self, port: int, decode=json.loads) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decode = decode

    def recv_exactly(self, count: int) -> bytes:
        buf = bytearray(count)
        view = memoryview(buf)
        got = 0
        while got < count:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("server left")
            got += n
        return bytes(buf)

    def request(self, message: bytes):
        self.sock.sendall(struct.pack(">I", len(message)) + message)
        length = struct.unpack(">I", self.recv_exactly(4))[0] & 0x7FFFFFFF
        return self.decode(self.recv_exactly(length))


# --- the workloads ---------------------------------------------------------------------------------


def classic_exchanges() -> None:
    workload = f"classic exchanges, {CONNECTIONS} clients"
    say(workload)
    peers = ["framesock", "native", "seed-loop", "socketserver", "asyncio", "uvloop"]
    load_rows_in_rounds(workload, "classic", [(peer, {"peer": peer}) for peer in peers])


def framed_concurrent(reply: str) -> None:
    workload = f"framed, {CONNECTIONS} connections, " + ("static reply" if reply == "static" else "Python handler")
    say(workload)
    peers = ["framesock", "native", "socketserver", "asyncio", "uvloop", "mpconn"]
    if reply == "handler":
        peers.remove("native")  # the ceiling has no Python in it
    load_rows_in_rounds(workload, "framed", [(peer, {"peer": peer, "reply": reply}) for peer in peers])


def workers() -> None:
    """Past one process: N workers against uvloop in N processes (SO_REUSEPORT), and a handler
    that works 50 µs per request on 2 workers against 1."""
    processes = 2
    workload = f"framed, {CONNECTIONS} connections, Python handler, {processes} processes"
    say(workload)
    spreads: list[list[int]] = []

    def every_peer() -> None:
        with workers_server(processes) as (port, lines):
            load_row(workload, f"framesock, --workers {processes}", port, "framed")
        spreads.append(connections_per_worker(lines))
        with server("uvloop", "framed", reply="handler", processes=processes) as port:
            load_row(workload, f"uvloop, {processes} processes (SO_REUSEPORT)", port, "framed")

    in_rounds(every_peer)
    mine = next(row for row in ROWS if row.workload == workload and row.peer.startswith("framesock"))
    shown = ", ".join("/".join(map(str, spread)) for spread in spreads)
    mine.note = f"{mine.note}; connections per worker by round: {shown}"
    WORKER_SPREADS.extend(spreads)

    workload = f"framed, {CONNECTIONS} connections, 50 µs Python handler"
    say(workload)

    def both() -> None:
        with workers_server(2, "peers:busy_handler") as (port, _):
            load_row(workload, "framesock, --workers 2", port, "framed")
        with workers_server(1, "peers:busy_handler") as (port, _):
            load_row(workload, "--workers 1", port, "framed")

    in_rounds(both)


def proxy_protocol() -> None:
    """The PROXY protocol's cost on kept connections: the same server with and without it, the
    load generator writing a v2 header first on each connection."""
    for reply in ("static", "handler"):
        workload = f"framed, {CONNECTIONS} connections, {'static reply' if reply == 'static' else 'Python handler'}, PROXY v2"
        say(workload)

        def both(reply: str = reply, workload: str = workload) -> None:
            with server("framesock", "framed", reply=reply, proxy_protocol=True) as port:
                load_row(workload, "framesock --proxy-protocol", port, "framed", extra=("--proxy-header", "1"))
            with server("framesock", "framed", reply=reply) as port:
                load_row(workload, "without it", port, "framed")

        in_rounds(both)


# Connections each worker accepted, per round of the workers row (for the fairness target).
WORKER_SPREADS: list[list[int]] = []


def one_connection_from_python() -> None:
    workload = "framed round trips, one connection from Python"
    say(workload)
    with server("framesock", "framed") as port:
        with framesock.Client("127.0.0.1", port, protocol="framed") as client:
            timed_row(workload, "framesock", lambda: client.request("msg from client"))
    with server("native", "framed", threads=1) as port:
        load_row(workload, "native", port, "framed", connections=1, threads=1)
        with framesock.Client("127.0.0.1", port, protocol="framed") as client:
            timed_row(workload, "framesock client, native server", lambda: client.request("msg from client"))
    with server("framesock", "framed") as port:
        plain = SocketClient(port)
        timed_row(workload, "socket + json.loads", lambda: plain.request(b"msg from client"))
        plain.sock.close()
    with server("mpconn", "framed") as port:
        from multiprocessing.connection import Client as MPClient

        conn = MPClient(("127.0.0.1", port))

        def mp_round_trip():
            conn.send_bytes(b"msg from client")
            return json.loads(conn.recv_bytes())

        timed_row(workload, "mpconn", mp_round_trip)
        conn.close()
    with server("zmq", "framed") as port:
        import zmq

        context = zmq.Context()
        req = context.socket(zmq.REQ)
        req.connect(f"tcp://127.0.0.1:{port}")

        def zmq_round_trip():
            req.send(b"msg from client")
            return json.loads(req.recv())

        timed_row(workload, "zmq", zmq_round_trip)
        req.close(0)
        context.term()


def async_handlers() -> None:
    for python in BENCH_PYTHONS:
        async_handlers_on(python)


def async_handlers_on(python: str) -> None:
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, check=True).stdout.strip()
    workload = f"framed, {CONNECTIONS} connections, async handler, Python {version}"
    say(workload)
    peers = [
        ("framesock aio.Server", "framesock-aio", "asyncio"),
        ("framesock aio.Server on uvloop", "framesock-aio", "uvloop"),
        ("asyncio", "asyncio", "asyncio"),
        ("uvloop", "uvloop", "asyncio"),
    ]
    arguments = [(label, {"peer": peer, "reply": "async", "loop": loop, "python": python}) for label, peer, loop in peers]
    load_rows_in_rounds(workload, "framed", arguments, max(ROUNDS, STEADY_ROUNDS))
    TARGETS.extend([
        (workload, "uvloop", 1.3 if version >= "3.12" else 1.2, "framesock aio.Server"),
        (workload, "uvloop", 1.5 if version >= "3.12" else 1.2, "framesock aio.Server on uvloop"),
    ])  # fmt: skip


class StreamsClient:
    """asyncio streams doing what aio.Client does: one framed request, one reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, message: bytes):
        self.writer.write(struct.pack(">I", len(message)) + message)
        header = await self.reader.readexactly(4)
        return json.loads(await self.reader.readexactly(struct.unpack(">I", header)[0] & 0x7FFFFFFF))


async def timed_row_async(workload: str, label: str, call, warm_up: int, per_call: int = 1) -> None:
    """Awaits `call()` `warm_up` times, then for SECONDS, recording each call's time; the rate
    counts `per_call` requests per call."""
    for _ in range(warm_up):
        await call()
    latencies = []
    end = time.perf_counter() + SECONDS
    while (now := time.perf_counter()) < end:
        await call()
        latencies.append(time.perf_counter() - now)
    latencies.sort()
    ROWS.append(
        Row(workload, label, len(latencies) * per_call / sum(latencies), "req/s",
            latencies[len(latencies) // 2] * 1e6, latencies[int((len(latencies) - 1) * 0.99)] * 1e6)
    )  # fmt: skip
    say(f"  {workload} / {label}: {ROWS[-1].rate:.0f} req/s")


def aio_clients() -> None:
    import uvloop
    from framesock import aio

    workload = "aio round trips, one connection"
    say(workload)

    async def framesock_side(label: str, port: int) -> None:
        async with aio.Client("127.0.0.1", port, protocol="framed") as client:
            await timed_row_async(workload, label, lambda: client.request("msg from client"), warm_up=200)

    async def streams_side(label: str, port: int) -> None:
        client = StreamsClient(*await asyncio.open_connection("127.0.0.1", port))
        await timed_row_async(workload, label, lambda: client.request(b"msg from client"), warm_up=200)
        client.writer.close()

    with server("framesock", "framed") as port:
        asyncio.run(framesock_side("framesock aio.Client", port))
        uvloop.run(framesock_side("framesock aio.Client on uvloop", port))
        asyncio.run(streams_side("asyncio streams", port))
        uvloop.run(streams_side("uvloop streams", port))


def aio_concurrent() -> None:
    """What pipelining buys: 100 concurrent request() calls on one aio.Client (gather) against
    the same over one asyncio streams connection guarded by a lock, as a user would write it."""
    from framesock import aio

    workload = "aio, 100 concurrent requests on one connection"
    say(workload)

    async def measure(label: str, request) -> None:
        async def batch() -> None:
            await asyncio.gather(*(request() for _ in range(100)))

        await timed_row_async(workload, label, batch, warm_up=20, per_call=100)

    async def framesock_side(port: int) -> None:
        async with aio.Client("127.0.0.1", port, protocol="framed") as client:
            await measure("framesock aio.Client", lambda: client.request("msg from client"))

    async def streams_side(port: int) -> None:
        client = StreamsClient(*await asyncio.open_connection("127.0.0.1", port))
        lock = asyncio.Lock()

        async def request():
            async with lock:
                return await client.request(b"msg from client")

        await measure("asyncio streams + lock", request)
        client.writer.close()

    with server("framesock", "framed") as port:
        asyncio.run(framesock_side(port))
        asyncio.run(streams_side(port))


def pipelined() -> None:
    workload = "pipelined batches of 1000 (request_many)"
    say(workload)
    batch = ["msg from client"] * 1000
    with server("framesock", "framed") as port:
        with framesock.Client("127.0.0.1", port, protocol="framed") as client:
            timed_row(workload, "framesock", lambda: client.request_many(batch), "msg/s", per_call=len(batch))

            def loop():
                for message in batch:
                    client.request(message)

            timed_row(workload, "request in a loop", loop, "msg/s", per_call=len(batch))


def big_frames() -> None:
    workload = "64 MiB frames, one connection"
    say(workload)

    def every_peer() -> None:
        for peer in ["framesock", "native", "asyncio", "uvloop", "socketserver"]:
            with server(peer, "framed") as port:
                result = loadgen("bigframes", "--port", str(port), "--size", str(64 << 20), "--count", "6")
                ROWS.append(Row(workload, peer, result["gb_per_s"], "GB/s"))
                say(f"  {workload} / {peer}: {result['gb_per_s']:.2f} GB/s")

    in_rounds(every_peer)


def reply_document(size: int) -> bytes:
    """A realistic JSON reply of about `size` bytes: a list of small records."""
    record = {"id": 12345, "name": "framesock", "tags": ["a", "b"], "score": 0.5, "ok": True}
    one = len(json.dumps(record)) + 2
    return json.dumps([dict(record, id=i) for i in range(max(1, size // one))]).encode()


def reply_decoding() -> None:
    for size, label in [(1 << 10, "1 KiB"), (64 << 10, "64 KiB"), (1 << 20, "1 MiB"), (10 << 20, "10 MiB")]:
        workload = f"reply decoding, {label} reply"
        say(workload)
        with tempfile.NamedTemporaryFile(suffix=".json") as doc:
            doc.write(reply_document(size))
            doc.flush()
            with server("native", "framed", reply_file=doc.name) as port:
                in_rounds(lambda: decode_every_way(workload, port))


def decode_every_way(workload: str, port: int) -> None:
    """One round of the reply-decoding rows: framesock's client, then a plain socket with each
    JSON decoder, against the same server."""
    import jiter
    import orjson

    with framesock.Client("127.0.0.1", port, protocol="framed", max_reply=64 << 20) as client:
        timed_row(workload, "framesock", lambda: client.request("x"))
    decoders = [
        ("socket + json.loads", json.loads),
        ("socket + orjson.loads", orjson.loads),
        ("socket + jiter.from_json", jiter.from_json),
    ]
    for name, decode in decoders:
        plain = SocketClient(port, decode)
        timed_row(workload, name, lambda: plain.request(b"x"))
        plain.sock.close()


def beside_json_documents() -> None:
    """Small JSON requests to a request_as="json" server, alone and beside a peer that streams
    14 MiB JSON documents to the same server without pause: what one client's huge documents
    cost the others (decoding gives the GIL up every 32k values)."""
    import threading

    document = json.dumps([{"a": i} for i in range(1_000_000)]).encode()  # ~15 MiB
    for label, streaming in [("alone", False), ("beside a peer streaming 14 MiB documents", True)]:
        workload = f"small JSON requests, {label}"
        say(workload)
        with framesock.Server(lambda r: r, port=0, protocol="framed", request_as="json") as srv:
            stop = threading.Event()

            def stream() -> None:
                with framesock.Client(*srv.address[:2], protocol="framed", timeout=120) as peer:
                    while not stop.is_set():
                        peer.request(document)

            streamer = threading.Thread(target=stream, daemon=True)
            if streaming:
                streamer.start()
                time.sleep(1)  # the first documents are in
            with framesock.Client(*srv.address[:2], protocol="framed") as client:
                timed_row(workload, "framesock", lambda: client.request('{"small": 1}'))
            stop.set()
            if streaming:
                streamer.join(120)


def tls_workloads() -> None:
    """TLS: framesock against asyncio + ssl and uvloop + ssl doing the same work; certificates
    made here with trustme (a CA and a certificate for localhost)."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    with tempfile.TemporaryDirectory() as where:
        paths = {name: str(Path(where) / name) for name in ("cert.pem", "key.pem", "ca.pem")}
        cert.cert_chain_pems[0].write_to_path(paths["cert.pem"])
        cert.private_key_pem.write_to_path(paths["key.pem"])
        ca.cert_pem.write_to_path(paths["ca.pem"])
        tls = (paths["cert.pem"], paths["key.pem"])
        trust = ("--tls-ca", paths["ca.pem"])
        for reply, label in [("static", "static reply"), ("handler", "Python handler")]:
            workload = f"TLS, {CONNECTIONS} connections, {label}"
            say(workload)
            for peer in ["framesock", "asyncio", "uvloop"]:
                with server(peer, "framed", reply=reply, tls=tls) as port:
                    load_row(workload, peer, port, "framed", extra=trust)
        workload = f"TLS, new connections (handshake and one exchange), {CONNECTIONS} at a time"
        say(workload)
        for peer in ["framesock", "asyncio", "uvloop"]:
            with server(peer, "framed", tls=tls) as port:
                load_row(workload, peer, port, "framed", extra=trust + ("--reconnect", "1"))
        workload = "TLS round trips, one connection from Python"
        say(workload)
        with server("framesock", "framed", tls=tls) as port:
            client_tls = framesock.ClientTLS(paths["ca.pem"])
            with framesock.Client("localhost", port, protocol="framed", tls=client_tls) as client:
                timed_row(workload, "framesock", lambda: client.request("x"))
            context = ssl.create_default_context(cafile=paths["ca.pem"])
            plain = SocketClient(port)
            plain.sock = context.wrap_socket(plain.sock, server_hostname="localhost")
            timed_row(workload, "ssl socket + json.loads", lambda: plain.request(b"x"))
            plain.sock.close()


def tls_over_plain_lines() -> list[str]:
    """framesock's TLS rate over its own plain-TCP rate on the same workload (target ≥ 0.6)."""
    lines = []
    for label in ["static reply", "Python handler"]:
        tls_rate = framesock_rate(f"TLS, {CONNECTIONS} connections, {label}")
        plain_rate = framesock_rate(f"framed, {CONNECTIONS} connections, {label}")
        if tls_rate and plain_rate:
            achieved = tls_rate / plain_rate
            verdict = "met" if achieved >= 0.6 else "**missed**"
            lines.append(f"- TLS, {CONNECTIONS} connections, {label}: framesock TLS ÷ framesock plain = {achieved:.2f} (target ≥ 0.60): {verdict}")
    return lines


# --- report ----------------------------------------------------------------------------------------

TARGETS = [
    # (workload, peer, minimum framesock/peer)
    ("framed round trips, one connection from Python", "native", 0.95),
    # One connection, sequential: the round trip is the server's and the kernel's (a hand-written
    # asyncio.Protocol client measured the same as streams), so aio.Client only must not lose.
    ("aio round trips, one connection", "asyncio streams", 1.0),
    ("aio, 100 concurrent requests on one connection", "asyncio streams + lock", 1.0),
    (f"framed, {CONNECTIONS} connections, static reply", "uvloop", 2.5),
    (f"framed, {CONNECTIONS} connections, static reply", "native", 0.9),
    (f"framed, {CONNECTIONS} connections, Python handler", "uvloop", 1.5),
    (f"classic exchanges, {CONNECTIONS} clients", "native", 0.95),
    ("pipelined batches of 1000 (request_many)", "request in a loop", 5.0),
    ("64 MiB frames, one connection", "native", 0.9),
    ("reply decoding, 1 KiB reply", "socket + orjson.loads", 1 / 1.2),
    ("reply decoding, 64 KiB reply", "socket + orjson.loads", 1.0),
    ("reply decoding, 1 MiB reply", "socket + orjson.loads", 1.0),
    ("reply decoding, 10 MiB reply", "socket + orjson.loads", 1.0),
    (f"TLS, {CONNECTIONS} connections, static reply", "uvloop", 2.0),
    (f"TLS, {CONNECTIONS} connections, Python handler", "uvloop", 2.0),
    (f"framed, {CONNECTIONS} connections, static reply, PROXY v2", "without it", 0.95),
    (f"framed, {CONNECTIONS} connections, Python handler, PROXY v2", "without it", 0.95),
    (f"framed, {CONNECTIONS} connections, Python handler, 2 processes", "uvloop, 2 processes (SO_REUSEPORT)", 1.5),
    (f"framed, {CONNECTIONS} connections, 50 µs Python handler", "--workers 1", 1.6),
]


def framesock_row(workload: str, label: str | None = None) -> Row | None:
    """The workload's first framesock row (the one the peers are compared with), or the row
    `label` (a median row's peer reads "label (median of ...)")."""
    for row in ROWS:
        if row.workload != workload:
            continue
        if label is None and row.peer.startswith("framesock"):
            return row
        if label is not None and (row.peer == label or row.peer.startswith(label + " (")):
            return row
    return None


def framesock_rate(workload: str, label: str | None = None) -> float | None:
    row = framesock_row(workload, label)
    return row.rate if row else None


def achieved(workload: str, peer: str, label: str | None = None) -> float | None:
    """framesock's rate ÷ the peer's. For peers measured in rounds, the median of the rounds'
    ratios: the two were measured back to back, on the same machine's mood, while their median
    rows may come from different minutes (this machine's speed swings by 2x)."""
    mine = framesock_row(workload, label)
    theirs = next((row for row in ROWS if row.workload == workload and row.peer == peer), None)
    if mine is None or theirs is None or not theirs.rate:
        return None
    rounds = ROUND_RATES.get((workload, mine.peer)), ROUND_RATES.get((workload, peer))
    if rounds[0] and rounds[1] and len(rounds[0]) == len(rounds[1]):
        ratios = sorted(a / b for a, b in zip(*rounds) if b)
        return ratios[len(ratios) // 2]
    return mine.rate / theirs.rate


def ratio(row: Row) -> str:
    if row.peer.startswith("framesock"):
        return ""
    value = achieved(row.workload, row.peer)
    return "" if value is None else f"{value:.2f}x"


def fmt_latency(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def table() -> str:
    lines = [
        "| workload | peer | rate | p50 µs | p99 µs | framesock ÷ peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        rate = f"{row.rate:,.2f} {row.unit}" if row.unit == "GB/s" else f"{row.rate:,.0f} {row.unit}"
        note = f" ({row.note})" if row.note else ""
        lines.append(
            f"| {row.workload} | {row.peer}{note} | {rate} | {fmt_latency(row.p50_us)} | "
            f"{fmt_latency(row.p99_us)} | {ratio(row)} |"
        )
    return "\n".join(lines)


def target_lines() -> list[str]:
    lines = []
    for workload, peer, minimum, *which in TARGETS:
        ratio_now = achieved(workload, peer, *which)
        if ratio_now is None:
            lines.append(f"- {workload}: {which[0] if which else 'framesock'} ÷ {peer}: not measured")
            continue
        verdict = "met" if ratio_now >= minimum else "**missed**"
        lines.append(
            f"- {workload}: {which[0] if which else 'framesock'} ÷ {peer} = {ratio_now:.2f} (target ≥ {minimum:.2f}): {verdict}"
            + noisy(workload, peer, *which)
        )  # fmt: skip
    return lines + tls_over_plain_lines() + fairness_lines()


def noisy(workload: str, peer: str, label: str | None = None) -> str:
    """A warning for a verdict drawn from rounds whose rates spread more than 2x: the machine's
    mood, not the code, may have decided it (the ratio is kept as measured)."""
    mine = framesock_row(workload, label)
    spreads = []
    for name in (mine.peer if mine else None, peer):
        rates = ROUND_RATES.get((workload, name)) if name else None
        if rates and min(rates) > 0 and max(rates) / min(rates) > 2:
            spreads.append(f"{name}'s rounds spread {max(rates) / min(rates):.1f}x")
    return f" (noisy: {', '.join(spreads)})" if spreads else ""


def fairness_lines() -> list[str]:
    """No worker above twice its fair share of the connections, in any round."""
    if not WORKER_SPREADS:
        return []
    worst = max(max(spread) * len(spread) / sum(spread) for spread in WORKER_SPREADS if spread and sum(spread))
    verdict = "met" if worst <= 2 else "**missed**"
    return [f"- workers: the busiest worker's connections ÷ its fair share, worst round = {worst:.2f} (target ≤ 2): {verdict}"]


def chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row.workload for row in ROWS))
    fig, axes = plt.subplots(len(workloads), 1, figsize=(9, 1.1 + 0.42 * len(ROWS)), squeeze=False)
    for axis, workload in zip(axes[:, 0], workloads):
        rows = [row for row in ROWS if row.workload == workload]
        names = [row.peer for row in rows]
        values = [row.rate for row in rows]
        colors = ["#d95f02" if name.startswith("framesock") else "#7570b3" if name == "native" else "#999999" for name in names]
        axis.barh(names, values, color=colors)
        axis.invert_yaxis()
        axis.set_title(f"{workload} ({rows[0].unit}, higher is better)", fontsize=9, loc="left")
        axis.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_times() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far, from /proc/stat."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7]


def main() -> None:
    if not FSBENCH.exists():
        sys.exit(f"build the load generator first: cargo build --release --manifest-path {HERE / 'native' / 'Cargo.toml'}")
    only = set(sys.argv[1:])
    steps = {
        "classic": classic_exchanges,
        "static": lambda: framed_concurrent("static"),
        "handler": lambda: framed_concurrent("handler"),
        "one": lambda: in_rounds(one_connection_from_python),
        "aio-server": async_handlers,
        "aio-client": lambda: in_rounds(aio_clients),
        "aio-concurrent": lambda: in_rounds(aio_concurrent),
        "pipelined": pipelined,
        "big": big_frames,
        "decode": reply_decoding,
        "tls": tls_workloads,
        "json-bomb": beside_json_documents,
        "workers": workers,
        "proxy": proxy_protocol,
    }
    before = cpu_times()
    for name, step in steps.items():
        if not only or name in only:
            step()
    after = cpu_times()
    # A virtual machine's CPUs are taken by its host at times ("steal"); a server that hands work
    # between threads suffers from it more than a single-threaded one, so the ratios with it.
    stolen = (after[1] - before[1]) / max(1, after[0] - before[0])
    report = table()
    targets = target_lines() + [f"- CPU time taken by the host during the run (steal): {stolen:.0%}"]
    print(report)
    print()
    print("\n".join(targets))
    if only:
        return  # a partial run does not replace the recorded results
    header = (
        f"# framesock benchmark results\n\nMeasured by `make bench` on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}, "
        f"framesock {framesock.__version__}, {SECONDS:g} s per row. The machine is shared, so absolute "
        "figures drift between runs; the ratios compare peers measured minutes apart in one run.\n\n"
    )
    (HERE / "RESULTS.md").write_text(header + report + "\n\n## Targets\n\n" + "\n".join(targets) + "\n\n![chart](results.png)\n")
    chart(HERE / "results.png")
    print(f"\nwrote {HERE / 'RESULTS.md'} and {HERE / 'results.png'}")


if __name__ == "__main__":
    main()
