"""An asyncio program: aio.Server and aio.Client, 1000 concurrent requests, both shut down, return.

framesock 0.1 ended this with SIGSEGV or SIGABRT in about 1 run in 5 to 40."""

import asyncio
from framesock import aio

async def handler(request):
    await asyncio.sleep(0)
    return {"echo": request}

async def main():
    server = aio.Server(handler, port=0, protocol="framed")
    await server.start()
    client = aio.Client(*server.address[:2], protocol="framed")
    replies = await asyncio.gather(*(client.request(str(i)) for i in range(1000)))
    assert replies[999] == {"echo": "999"}, replies[999]
    await client.close()
    await server.shutdown()

asyncio.run(main())
