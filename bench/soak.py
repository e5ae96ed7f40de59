"""Soak test: good clients beside hostile ones against one framesock server, for minutes.

Run by ``make soak`` (``SOAK_SECONDS``, default 300; ``SOAK_GOOD`` and ``SOAK_HOSTILE``
connections, default 300 each). The server runs in its own process with its default limits;
this process runs the clients on one asyncio loop (plus a thread of blocking clients) and,
every second, samples the server's RSS, open file descriptors and connections and the good
clients' latency. It writes ``bench/SOAK.md`` and ``bench/soak.png`` and exits non-zero if a
good reply was lost or mixed up, or the server's descriptors did not come back down.

The good clients check every reply against the request it answers (each request carries a
unique id), so a reply given to the wrong request counts as mixed, one that never comes as lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
GOOD = int(os.environ.get("SOAK_GOOD", "300"))
HOSTILE = int(os.environ.get("SOAK_HOSTILE", "300"))

SERVER = """
import json, sys, threading, time
import framesock

def handler(request):
    if request.startswith("big"):
        return "x" * (1 << 20)  # a 1 MiB reply, for the peers that never read theirs
    return {"id": request}

server = framesock.Server(handler, port=0, protocol="framed")
print(json.dumps({"port": server.address[1]}), flush=True)
server.start()
try:
    while True:
        print(json.dumps(server.stats()), flush=True)
        time.sleep(1)
except (KeyboardInterrupt, BrokenPipeError):
    server.shutdown(timeout=2)
"""


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class Tally:
    """What the good clients saw, per one-second window."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ok = 0
        self.mixed = 0
        self.lost = 0

    def record(self, expected: str, reply, started: float) -> None:
        with self.lock:
            if reply == {"id": expected}:
                self.ok += 1
                self.latencies.append(time.perf_counter() - started)
            else:
                self.mixed += 1

    def take_latencies(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
            return taken


# --- good clients ----------------------------------------------------------------------------------


async def good_aio_client(port: int, name: str, tally: Tally, until: float) -> None:
    from framesock import aio

    n = 0
    async with aio.Client("127.0.0.1", port, protocol="framed", timeout=30) as client:
        while time.monotonic() < until:
            n += 1
            request = f"{name}-{n}"
            started = time.perf_counter()
            try:
                reply = await client.request(request)
            except Exception:  # noqa: BLE001 - counted: a good request must not fail
                with tally.lock:
                    tally.lost += 1
                continue
            tally.record(request, reply, started)
            await asyncio.sleep(random.uniform(0.05, 0.2))


def good_blocking_clients(port: int, tally: Tally, until: float, count: int) -> None:
    import framesock

    def run(index: int) -> None:
        n = 0
        with framesock.Client("127.0.0.1", port, protocol="framed", timeout=30) as client:
            while time.monotonic() < until:
                n += 1
                if index == 0 and n % 10 == 0:  # one client pipelines batches
                    batch = [f"b{index}-{n}-{i}" for i in range(100)]
                    started = time.perf_counter()
                    try:
                        replies = client.request_many(batch)
                    except Exception:  # noqa: BLE001
                        with tally.lock:
                            tally.lost += len(batch)
                        continue
                    for request, reply in zip(batch, replies):
                        tally.record(request, reply, started)
                    continue
                request = f"t{index}-{n}"
                started = time.perf_counter()
                try:
                    reply = client.request(request)
                except Exception:  # noqa: BLE001
                    with tally.lock:
                        tally.lost += 1
                    continue
                tally.record(request, reply, started)
                time.sleep(random.uniform(0.05, 0.2))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- hostile peers ---------------------------------------------------------------------------------


async def hostile_peer(port: int, kind: str, until: float, counts: dict) -> None:
    """Misbehaves in one way, over and over, until `until`."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        counts[kind] = counts.get(kind, 0) + 1
        try:
            if kind == "silent":  # connect and say nothing
                await asyncio.sleep(min(90, until - time.monotonic()))
            elif kind == "drip":  # one byte a second
                for byte in frame(b"drip" * 20):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1)
            elif kind == "unread":  # pipeline requests for 1 MiB replies, never read them
                writer.write(frame(b"big") * 256)
                await writer.drain()
                await asyncio.sleep(min(30, until - time.monotonic()))
            elif kind == "oversized":  # a header far over max_frame, then a stream of bytes
                writer.write(struct.pack(">I", 0xFFFF_FFF0) + b"x" * 65536)
                await writer.drain()
                await asyncio.sleep(1)
            elif kind == "garbage":
                writer.write(os.urandom(random.randint(1, 512)))
                await writer.drain()
                await asyncio.sleep(0.5)
            elif kind == "half":  # half a frame, then leave
                writer.write(frame(b"half a request")[:9])
                await writer.drain()
                await asyncio.sleep(0.2)
            elif kind == "pin":  # most of a 16 MiB request, slowly
                writer.write(struct.pack(">I", 16 << 20))
                for _ in range(8):
                    writer.write(b"p" * (1 << 20))
                    await writer.drain()
                    await asyncio.sleep(2)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


HOSTILE_KINDS = ["silent", "drip", "unread", "oversized", "garbage", "half", "pin"]


# --- measuring -------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def soak(port: int, server: subprocess.Popen, stats_lines: list[dict]) -> dict:
    tally = Tally()
    until = time.monotonic() + SECONDS
    counts: dict = {}
    samples = []
    blocking = min(8, GOOD)
    tasks = [asyncio.ensure_future(good_aio_client(port, f"a{i}", tally, until)) for i in range(GOOD - blocking)]
    tasks += [
        asyncio.ensure_future(hostile_peer(port, HOSTILE_KINDS[i % len(HOSTILE_KINDS)], until, counts))
        for i in range(HOSTILE)
    ]
    threaded = threading.Thread(target=good_blocking_clients, args=(port, tally, until, blocking), daemon=True)
    threaded.start()
    start = time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(1)
        latencies = tally.take_latencies()
        latest = stats_lines[-1] if stats_lines else {}
        samples.append(
            {
                "t": round(time.monotonic() - start, 1),
                "rss_mib": rss_mib(server.pid),
                "fds": fd_count(server.pid),
                "connections": latest.get("connections_active", 0),
                "buffered_mib": latest.get("bytes_buffered", 0) / (1 << 20),
                "p50_ms": percentile(latencies, 0.5) * 1000,
                "p99_ms": percentile(latencies, 0.99) * 1000,
                "replies": len(latencies),
            }
        )
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().run_in_executor(None, threaded.join)
    return {"tally": tally, "samples": samples, "hostile_connections": counts}


def main() -> int:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "python"))
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env)
    port = json.loads(server.stdout.readline())["port"]
    stats_lines: list[dict] = []

    def follow() -> None:
        for line in server.stdout:
            stats_lines.append(json.loads(line))

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(1)
    fds_before = fd_count(server.pid)
    rss_before = rss_mib(server.pid)
    print(f"soak: {SECONDS:g} s, {GOOD} good and {HOSTILE} hostile connections, server pid {server.pid}")
    result = asyncio.run(soak(port, server, stats_lines))
    # Every client has gone: the server's descriptors must come back down.
    deadline = time.monotonic() + 30
    while fd_count(server.pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.5)
    fds_after = fd_count(server.pid)
    time.sleep(1.5)  # a stats line from after the last client left
    final_stats = stats_lines[-1] if stats_lines else {}
    held_after = final_stats.get("bytes_buffered", -1)
    server.terminate()
    server.wait(10)

    tally: Tally = result["tally"]
    samples = result["samples"]
    rss_peak = max(s["rss_mib"] for s in samples)
    p99s = [s["p99_ms"] for s in samples if s["replies"]]
    p50s = [s["p50_ms"] for s in samples if s["replies"]]
    ok = tally.mixed == 0 and tally.lost == 0 and fds_after <= fds_before and held_after == 0
    lines = [
        "# framesock soak",
        "",
        f"Run by `make soak` on {time.strftime('%Y-%m-%d')}: {SECONDS:g} s, {GOOD} good connections "
        f"(aio clients, {min(8, GOOD)} blocking clients, one pipelining batches of 100) and {HOSTILE} "
        f"hostile ones ({', '.join(HOSTILE_KINDS)}, reconnecting after each try) against one "
        "framesock `Server` with its default limits, on this 2-core machine.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| good replies, correct | {tally.ok:,} |",
        f"| good replies, mixed up (wrong request's reply) | {tally.mixed} |",
        f"| good requests lost (error or no reply) | {tally.lost} |",
        f"| hostile connections made | {sum(result['hostile_connections'].values()):,} |",
        f"| server RSS: start / peak / end | {rss_before:.0f} / {rss_peak:.0f} / {samples[-1]['rss_mib']:.0f} MiB |",
        f"| server fds: before / after all clients left | {fds_before} / {fds_after} |",
        f"| request bytes held after all clients left (`bytes_buffered`) | {held_after} |",
        f"| good p50 per second: median / worst | {statistics.median(p50s):.2f} / {max(p50s):.2f} ms |",
        f"| good p99 per second: median / worst | {statistics.median(p99s):.2f} / {max(p99s):.2f} ms |",
        f"| server counters at the end | `{json.dumps(final_stats)}` |",
        "",
        f"Result: **{'pass' if ok else 'FAIL'}**",
        "",
        "![soak](soak.png)",
        "",
    ]
    (HERE / "SOAK.md").write_text("\n".join(lines))
    try:
        chart(samples, HERE / "soak.png")
    except ImportError:
        print("matplotlib missing: no chart")
    print("\n".join(lines))
    return 0 if ok else 1


def chart(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["rss_mib"] for s in samples])
    axes[0].set_ylabel("server RSS, MiB")
    axes[1].plot(t, [s["fds"] for s in samples], label="fds")
    axes[1].plot(t, [s["connections"] for s in samples], label="connections")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [s["buffered_mib"] for s in samples])
    axes[2].set_ylabel("buffered, MiB")
    axes[3].plot(t, [s["p50_ms"] for s in samples], label="p50")
    axes[3].plot(t, [s["p99_ms"] for s in samples], label="p99")
    axes[3].set_ylabel("good latency, ms")
    axes[3].set_xlabel("seconds")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
