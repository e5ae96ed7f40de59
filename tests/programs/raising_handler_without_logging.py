"""A script that never imports logging, whose handler raises (so framesock logs an error).

On Python 3.9-3.12 framesock 0.1 never exited: the I/O thread that first imported logging was taken
for the main thread."""

import framesock

def handler(request):
    raise ValueError("boom")

with framesock.Server(handler, port=0) as server:
    try:
        framesock.start_client(*server.address[:2], timeout=5)
    except framesock.FramesockError:
        pass
