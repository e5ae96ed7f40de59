"""fork() after the parent served; the child serves and requests on its own, and shuts down the
parent's server (which it inherited but does not run). framesock 0.1 hung in the child."""

import os
import framesock

with framesock.Server(response={"where": "parent"}, port=0, protocol="framed") as parent:
    with framesock.Client(*parent.address[:2], protocol="framed") as client:
        assert client.request("x") == {"where": "parent"}
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            with framesock.Server(lambda r: {"where": "child", "got": r}, port=0, protocol="framed") as child:
                with framesock.Client(*child.address[:2], protocol="framed", timeout=5) as c:
                    assert c.request("y") == {"where": "child", "got": "y"}
            parent.shutdown(timeout=1)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, status
