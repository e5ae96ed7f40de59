"""A server whose handler sleeps, four clients hammering it, and the script just ends.

framesock 0.1 aborted here (an I/O thread ended by the exiting interpreter inside a handler)."""

import threading, time
import framesock

def handler(request):
    time.sleep(0.01)
    return request

server = framesock.Server(handler, port=0, protocol="framed")
server.start()
host, port = server.address[:2]
started = threading.Barrier(5)

def hammer():
    client = framesock.Client(host, port, protocol="framed", timeout=5)
    started.wait()
    while True:
        try:
            client.request("x")
        except Exception:
            return

for _ in range(4):
    threading.Thread(target=hammer, daemon=True).start()
started.wait()
time.sleep(0.05)
# the script ends here, requests in flight, handlers sleeping
