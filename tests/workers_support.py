"""What the whole-program tests of workers share: ``framesock-server`` as a subprocess whose log
is read as it comes, an app module written for the test, and a load of framed clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import framesock

APP = '''
import asyncio, os, time
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "version.txt")) as f:
    VERSION = f.read().strip()
# Every request a handler sees is written here, one line each (O_APPEND: lines never mix).
HANDLED = os.open(os.path.join(HERE, "handled.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def handler(request):
    os.write(HANDLED, (request + "\\n").encode())
    if request.startswith("sleep "):
        time.sleep(float(request.split()[1]))
    return {"pid": os.getpid(), "version": VERSION, "request": request}

async def coroutine(request):
    await asyncio.sleep(0)
    return {"pid": os.getpid(), "coroutine": request}

static = {"static": True}
'''

# Generous bounds: they only turn a hang into a failure.
START_LIMIT = 30.0
STOP_LIMIT = 40.0


def write_app(directory: Path, version: str = "1") -> Path:
    (directory / "app.py").write_text(APP)
    (directory / "version.txt").write_text(version)
    return directory


def handled(directory: Path) -> list[str]:
    path = directory / "handled.log"
    return path.read_text().split("\n")[:-1] if path.exists() else []


class Program:
    """``framesock-server ARGS`` (or ``python ARGS`` with ``python=True``, or ``EXE ARGS``) in
    ``cwd``, under ``wrap`` (``ip netns exec NS``) if given; its stderr is kept line by line. ``close()`` kills it and every worker it announced."""

    def __init__(
        self, args: list[str], cwd: Path, python: bool = False, wrap: Optional[list[str]] = None, exe: Optional[str] = None
    ) -> None:
        if exe is not None:  # another program altogether (haproxy)
            command = [exe, *args]
        else:
            command = [sys.executable, *args] if python else [sys.executable, "-m", "framesock.server", *args]
        self.process = subprocess.Popen(
            [*(wrap or []), *command], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stderr, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stdout, self.out), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        try:
            for raw in stream:
                with self._changed:
                    into.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        except (OSError, ValueError):
            pass  # closed under it (see `close`): the end of what it can read
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, limit: float = START_LIMIT) -> list[re.Match[str]]:
        """Waits until ``pattern`` matches ``count`` lines of the log; returns the matches."""
        deadline = time.monotonic() + limit
        with self._changed:
            while True:
                found = [m for m in map(re.compile(pattern).search, self.lines) if m]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                assert left > 0 and self.process.poll() is None or len(found) >= count, (
                    f"waited for {count} x {pattern!r}; log:\n" + "\n".join(self.lines)
                )
                self._changed.wait(min(left, 0.2) if left > 0 else 0.01)

    def address(self) -> tuple[str, int]:
        match = self.wait_for(r"listening on (.+):(\d+)$")[0]
        return match[1].strip("[]"), int(match[2])

    def serving(self, count: int) -> list[int]:
        """Waits for ``count`` workers to announce they serve; returns their pids."""
        return [int(m[1]) for m in self.wait_for(r"\(pid (\d+)\) serving", count)]

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, limit: float = STOP_LIMIT) -> int:
        status = self.process.wait(limit)
        for reader in self._readers:
            reader.join(5)
        return status

    def worker_pids(self) -> set[int]:
        return {int(m) for m in re.findall(r"\(pid (\d+)\) started", self.log)}

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        # Each reader ends at its pipe's end of file, once every holder (workers too) is gone; a
        # stream is closed only after its reader has left it: closed under a reading thread, 3.13.0
        # raised "PyMemoryView_FromBuffer(): info->buf must not be NULL" in that thread.
        for reader, stream in zip(self._readers, (self.process.stderr, self.process.stdout)):
            reader.join(5)
            if stream is not None and not reader.is_alive():
                stream.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Load:
    """``clients`` threads, each with its own kept framed ``Client``, sending numbered requests
    (``prefix`` before the number) one after another until stopped. Every reply and every
    failure is kept."""

    def __init__(self, address: Any, clients: int = 4, prefix: str = "", path: Optional[str] = None, **client: Any) -> None:
        self.address = address
        self.path = path
        self.prefix = prefix
        self.client = dict(client, protocol="framed", timeout=client.get("timeout", 20.0))
        self.replies: list[tuple[str, Any]] = []
        self.failures: list[tuple[str, BaseException]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, number: int) -> None:
        host, port = (None, None) if self.path else self.address[:2]
        client = framesock.Client(host, port, path=self.path, **self.client)
        index = 0
        try:
            while not self.stopping.is_set():
                index += 1
                request = f"{self.prefix}{number}-{index}"
                try:
                    reply = client.request(request)
                except Exception as err:  # kept to be looked at by the test
                    with self.lock:
                        self.failures.append((request, err))
                    if self.stopping.wait(0.05):
                        break
                    continue
                with self.lock:
                    self.replies.append((request, reply))
        finally:
            client.close()

    def count(self) -> int:
        with self.lock:
            return len(self.replies)

    def wait_for_replies(self, more: int, limit: float = START_LIMIT) -> None:
        target = self.count() + more
        deadline = time.monotonic() + limit
        while self.count() < target:
            assert time.monotonic() < deadline, f"only {self.count()} replies; failures: {self.failures[:5]}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)
