"""A blocking server's serve_forever() runs in a daemon thread; the main thread ends meanwhile.

framesock printed a Rust panic at every such exit ("A Tokio 1.x context was found, but it is
being shutdown"): the exit stopped the engine's runtime under the thread's wait."""

import threading, time
import framesock
server = framesock.Server(response=1, port=0, protocol="framed")
started = threading.Event()
def serve():
    started.set()
    server.serve_forever()
threading.Thread(target=serve, daemon=True).start()
started.wait(10)
with framesock.Client("127.0.0.1", server.port, protocol="framed") as client:
    assert client.request("x") == 1
