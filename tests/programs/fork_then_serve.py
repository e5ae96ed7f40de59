"""fork() after the parent served; the child serves and requests on its own (Server, Client,
aio.Client), and shuts down the parent's server (which it inherited but does not run).
framesock 0.1 hung in the child."""

import asyncio
import os
import traceback

import framesock
from framesock import aio


async def ask(address):
    async with aio.Client(*address[:2], protocol="framed", timeout=5) as client:
        return await client.request("z")


with framesock.Server(lambda r: {"where": "parent"}, port=0, protocol="framed") as parent:
    with framesock.Client(*parent.address[:2], protocol="framed") as client:
        assert client.request("x") == {"where": "parent"}
    assert asyncio.run(ask(parent.address)) == {"where": "parent"}
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            with framesock.Server(lambda r: {"where": "child", "got": r}, port=0, protocol="framed") as child:
                with framesock.Client(*child.address[:2], protocol="framed", timeout=5) as c:
                    assert c.request("y") == {"where": "child", "got": "y"}
                assert asyncio.run(ask(child.address)) == {"where": "child", "got": "z"}
            parent.shutdown(timeout=1)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
