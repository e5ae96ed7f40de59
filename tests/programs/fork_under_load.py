"""fork() again and again while the engine is busy: handler threads answering, I/O threads
reading and writing, a client pipelining, an asyncio loop in a thread sending requests. Each
child must get a working engine (a lock held by a parent thread at the instant of the fork must
not be taken in the child) and serve, request and exit on its own; a hung child fails the run."""

import asyncio
import os
import random
import threading
import time
import traceback

import framesock
from framesock import aio

FORKS = 8
CHILD_LIMIT = 10.0


async def ask(address, count):
    async with aio.Client(*address[:2], protocol="framed", timeout=5) as client:
        for index in range(count):
            assert await client.request(index) == {"got": str(index)}


def load(address, stop):
    with framesock.Client(*address[:2], protocol="framed", timeout=5) as client:
        while not stop.is_set():
            assert client.request_many(["a", "b", "c"]) == [{"got": m} for m in "abc"]


def aio_load(address, stop):
    async def main():
        while not stop.is_set():
            await ask(address, 5)

    asyncio.run(main())


def child():
    with framesock.Server(lambda r: {"child": r}, port=0, protocol="framed") as server:
        with framesock.Client(*server.address[:2], protocol="framed", timeout=5) as client:
            assert client.request("y") == {"child": "y"}

        async def via_aio():
            async with aio.Client(*server.address[:2], protocol="framed", timeout=5) as c:
                return await c.request("z")

        assert asyncio.run(via_aio()) == {"child": "z"}


def wait_child(pid):
    deadline = time.monotonic() + CHILD_LIMIT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"


with framesock.Server(lambda r: {"got": r}, port=0, protocol="framed", handler_threads=4) as server:
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(server.address, stop)) for _ in range(3)]
    threads.append(threading.Thread(target=aio_load, args=(server.address, stop)))
    for thread in threads:
        thread.start()
    try:
        for _ in range(FORKS):
            time.sleep(random.uniform(0, 0.02))
            pid = os.fork()
            if pid == 0:
                status = 1
                try:
                    child()
                    status = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(status)
            result = wait_child(pid)
            assert result == 0, f"child: {result}"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
