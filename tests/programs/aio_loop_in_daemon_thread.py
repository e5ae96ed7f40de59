"""An asyncio loop using framesock.aio runs in a daemon thread; the main thread ends meanwhile.

framesock 0.1 hung at exit, forever, in 20-50 % of runs on every CPython 3.9-3.13: the exit hook
dropped the loop's watcher while holding a lock the loop's thread, holding the GIL, waited for."""

import asyncio
import threading
from framesock import aio

started = threading.Event()


async def handler(request):
    await asyncio.sleep(0)
    return {"echo": request}


async def serve():
    async with aio.Server(handler, port=0, protocol="framed") as server:
        async with aio.Client(server.host, server.port, protocol="framed") as client:
            await client.request("first")
            started.set()
            while True:
                await asyncio.gather(*(client.request(str(i)) for i in range(20)))


threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
assert started.wait(20), "the loop thread never got its first reply"
