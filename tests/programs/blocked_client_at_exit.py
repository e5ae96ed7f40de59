"""A daemon thread waits in Client.request on a server that never answers; the script ends."""
import socket, threading, time
import framesock

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
port = listener.getsockname()[1]
started = threading.Event()

def ask():
    client = framesock.Client("127.0.0.1", port, protocol="framed", timeout=None)
    started.set()
    client.request("never answered")

for _ in range(3):
    threading.Thread(target=ask, daemon=True).start()
started.wait()
time.sleep(0.1)
