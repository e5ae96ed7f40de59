"""The load of tests/test_balancer.py, run on the client host (inside its network namespace).

    python balancer_load.py HOST PORT STOP_FILE SPEC

SPEC is JSON: ``{"groups": [{"name", "threads", "retries", "idempotent"}], "tutorial": N,
"client": "10.0.0.2"}``. Each thread of a group sends framed requests through one
``framesock.Client`` until STOP_FILE exists, and checks every reply (the request echoed, the
handler seeing the client host's address); ``tutorial`` threads do the same with a plain socket,
one request per connection, as a client that knows nothing of framesock. Progress goes to
stderr (``progress N``); the summary to stdout as JSON: replies and failures by group and cause.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from collections import Counter

import framesock

HOST, PORT, STOP_FILE, SPEC = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
LIMIT = 120.0  # the load ends by itself, whatever happens to the test

lock = threading.Lock()
replies: Counter[str] = Counter()
failures: Counter[str] = Counter()
wrong: list[str] = []
backends: Counter[str] = Counter()


def stopped() -> bool:
    return os.path.exists(STOP_FILE)


def check(group: str, sent: str, reply: object) -> None:
    with lock:
        if not isinstance(reply, dict) or reply.get("request") != sent or reply.get("client") != SPEC["client"]:
            wrong.append(f"{group}: sent {sent!r}, got {reply!r}")
            return
        replies[group] += 1
        backends[str(reply.get("backend"))] += 1


def framed(group: dict, index: int) -> None:
    name = group["name"]
    client = framesock.Client(HOST, PORT, protocol="framed", timeout=10, retries=group["retries"], idempotent=group["idempotent"])
    count = 0
    with client:
        while not stopped():
            count += 1
            message = f"{name}-{index}-{count}"
            try:
                check(name, message, client.request(message))
            except Exception as err:  # noqa: BLE001 - every failure is counted by its cause
                with lock:
                    failures[f"{name}: {type(err).__name__}: {err}"[:160]] += 1
                time.sleep(0.05)
    with lock:
        replies[f"{name} retries"] += client.stats()["retries"]


def tutorial(index: int) -> None:
    count = 0
    while not stopped():
        count += 1
        message = f"tutorial-{index}-{count}"
        try:
            with socket.create_connection((HOST, PORT), timeout=10) as sock:
                payload = message.encode()
                sock.sendall(struct.pack(">I", len(payload)) + payload)
                header = b""
                while len(header) < 4:
                    chunk = sock.recv(4 - len(header))
                    if not chunk:
                        raise ConnectionError("closed before the reply")
                    header += chunk
                (length,) = struct.unpack(">I", header)
                body = b""
                while len(body) < length & 0x7FFF_FFFF:
                    # Exactly the reply: a server that stops may say goodbye right after it.
                    chunk = sock.recv((length & 0x7FFF_FFFF) - len(body))
                    if not chunk:
                        raise ConnectionError("closed inside the reply")
                    body += chunk
            check("tutorial", message, json.loads(body))
        except Exception as err:  # noqa: BLE001
            with lock:
                failures[f"tutorial: {type(err).__name__}: {err}"[:160]] += 1
            time.sleep(0.05)


def main() -> None:
    threads = [
        threading.Thread(target=framed, args=(group, index), daemon=True)
        for group in SPEC["groups"]
        for index in range(group["threads"])
    ]
    threads += [threading.Thread(target=tutorial, args=(index,), daemon=True) for index in range(SPEC.get("tutorial", 0))]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while not stopped() and time.monotonic() - started < LIMIT:
        with lock:
            total = sum(count for group, count in replies.items() if not group.endswith("retries"))
        print(f"progress {total}", file=sys.stderr, flush=True)
        time.sleep(0.25)
    open(STOP_FILE, "a").close()
    for thread in threads:
        thread.join(30)
    json.dump({"replies": replies, "failures": failures, "wrong": wrong[:20], "backends": backends}, sys.stdout)
    sys.stdout.flush()


main()
