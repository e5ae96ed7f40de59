"""An asyncio loop serving with framesock.aio runs in a daemon thread, its handlers busy in
Python code (no await: on 3.12+ that code runs inside framesock's own callback, started
eagerly), while the main thread ends.

Python 3.9-3.13 end a daemon thread that asks for the GIL back once finalization has begun
with `pthread_exit`; inside a Rust frame its forced unwind aborted the process ("FATAL:
exception not rethrown"). framesock's exit hook now waits for such frames to return, and none
starts after it."""

import asyncio
import threading
import time

from framesock import aio

started = threading.Event()


async def handler(request):
    until = time.perf_counter() + 0.002
    while time.perf_counter() < until:  # bytecode all along: the GIL may be asked for anywhere
        pass
    return {"echo": request}


async def serve():
    async with aio.Server(handler, port=0, protocol="framed") as server:
        async with aio.Client(server.host, server.port, protocol="framed") as client:
            await client.request("first")
            started.set()
            while True:
                await asyncio.gather(*(client.request(str(i)) for i in range(8)))


threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
assert started.wait(20), "the loop thread never got its first reply"
