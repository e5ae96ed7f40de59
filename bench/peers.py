"""The servers framesock is measured against, written for the benchmark, plus framesock itself.

Run one as ``python bench/peers.py NAME --protocol classic|framed --reply static|handler``;
it prints ``PORT <n>`` once it listens on 127.0.0.1 and serves until it is killed.

Every peer speaks framesock's wire: requests are 4-byte big-endian length + payload; replies are
raw JSON ended by a close (classic) or framed the same way (framed). The "handler" reply calls
the same Python function everywhere: ``handler(request_text) -> dict``, encoded with json.dumps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import socketserver
import struct
import sys
import threading

SEED_REPLY = json.dumps({"key": "id", "val": 123}).encode()


def handler(request: str) -> dict:
    """The work every peer does per request in the "handler" workloads."""
    return {"echo": request, "length": len(request)}


# Iterations of `busy_handler`'s loop: about 50 µs of pure-Python work on this machine, idle.
BUSY_LOOP = 750


def busy_handler(request: str) -> dict:
    """A handler that works about 50 µs for each request, all of it holding the GIL."""
    total = 0
    for number in range(BUSY_LOOP):
        total += number * number
    return {"echo": request, "work": total}


async def async_handler(request: str) -> dict:
    """The same work as a coroutine, for the async-handler workloads."""
    return handler(request)


def static_reply(size: int) -> bytes:
    """The seed's reply, or a JSON string of `size` bytes."""
    if size < 2:
        return SEED_REPLY
    return b'"' + b"x" * (size - 2) + b'"'


def announce(port: int) -> None:
    print(f"PORT {port}", flush=True)


def reply_for(options) -> callable:
    """payload bytes -> reply JSON bytes."""
    if options.reply == "static":
        fixed = static_reply(options.reply_size)
        return lambda payload: fixed
    return lambda payload: json.dumps(handler(payload.decode("utf-8", "replace"))).encode()


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# --- framesock ---------------------------------------------------------------------------------


def run_framesock(options) -> None:
    import framesock

    tls = framesock.ServerTLS(options.tls_cert, options.tls_key) if options.tls_cert else None
    if options.reply == "static":
        server = framesock.Server(
            None, port=0, response=json.loads(static_reply(options.reply_size)), protocol=options.protocol,
            max_frame=2**31 - 1, max_connections=4096, tls=tls, proxy_protocol=options.proxy_protocol,
        )
    else:
        server = framesock.Server(
            handler, port=0, protocol=options.protocol, max_connections=4096, tls=tls, proxy_protocol=options.proxy_protocol
        )
    announce(server.address[1])
    server.serve_forever()


def run_framesock_aio(options) -> None:
    from framesock import aio

    async def main() -> None:
        server = aio.Server(async_handler, port=0, protocol=options.protocol, max_connections=4096)
        announce(server.address[1])
        await server.serve_forever()

    if options.loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# --- the seed's loop, made correct: one client at a time ----------------------------------------


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(min(count - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("peer left")
        chunks += chunk
    return bytes(chunks)


def run_seed_loop(options) -> None:
    respond = reply_for(options)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    announce(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                length = int.from_bytes(recv_exactly(conn, 4), "big")
                conn.sendall(respond(recv_exactly(conn, length)))
            except OSError:
                pass


# --- socketserver.ThreadingTCPServer -------------------------------------------------------------


def run_socketserver(options) -> None:
    respond = reply_for(options)
    framed = options.protocol == "framed"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    length = int.from_bytes(recv_exactly(sock, 4), "big")
                    reply = respond(recv_exactly(sock, length))
                    if not framed:
                        sock.sendall(reply)
                        return
                    sock.sendall(frame(reply))
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

    with Server(("127.0.0.1", 0), Handler) as server:
        announce(server.server_address[1])
        server.serve_forever()


# --- asyncio streams (and uvloop, the same code on its loop) -------------------------------------


def run_asyncio(options) -> None:
    respond = reply_for(options)
    framed = options.protocol == "framed"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(4)
                payload = await reader.readexactly(int.from_bytes(header, "big"))
                if options.reply == "async":
                    reply = json.dumps(await async_handler(payload.decode("utf-8", "replace"))).encode()
                else:
                    reply = respond(payload)
                if not framed:
                    writer.write(reply)
                    await writer.drain()
                    return
                writer.write(frame(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        context = None
        if options.tls_cert:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(options.tls_cert, options.tls_key)
        if options.port:
            # One of several processes on one port, each with its own socket (SO_REUSEPORT).
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", options.port))
            server = await asyncio.start_server(serve, sock=sock, backlog=1024, limit=2**31 - 1, ssl=context)
        else:
            server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024, limit=2**31 - 1, ssl=context)
        announce(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    if options.peer == "uvloop" or options.loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def run_processes(options) -> None:
    """``--processes N`` copies of the asyncio/uvloop peer on one port, each with a socket of its
    own (SO_REUSEPORT: the kernel spreads connections over them), as a multi-process asyncio
    server is deployed. A socket bound here but never listening holds the port."""
    import signal
    import subprocess

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    command = [sys.executable, __file__, options.peer, "--protocol", options.protocol, "--reply", options.reply, "--port", str(port)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(options.processes)]
    for child in children:
        child.stdout.readline()

    def stop(*_) -> None:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    announce(port)
    signal.pause()


# --- multiprocessing.connection: its send_bytes frames are 4-byte big-endian lengths too ---------


def run_mpconn(options) -> None:
    from multiprocessing.connection import Listener

    respond = reply_for(options)
    listener = Listener(("127.0.0.1", 0), backlog=1024)
    announce(listener.address[1])

    def serve(conn) -> None:
        with conn:
            try:
                while True:
                    conn.send_bytes(respond(conn.recv_bytes()))
            except (EOFError, OSError):
                pass

    while True:
        conn = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# --- pyzmq REQ/REP: not framesock's wire, so only Python clients of its own can drive it ---------


def run_zmq(options) -> None:
    import zmq

    respond = reply_for(options)
    context = zmq.Context()
    socket_ = context.socket(zmq.REP)
    port = socket_.bind_to_random_port("tcp://127.0.0.1")
    announce(port)
    while True:
        socket_.send(respond(socket_.recv()))


PEERS = {
    "framesock": run_framesock,
    "framesock-aio": run_framesock_aio,
    "seed-loop": run_seed_loop,
    "socketserver": run_socketserver,
    "asyncio": run_asyncio,
    "uvloop": run_asyncio,
    "mpconn": run_mpconn,
    "zmq": run_zmq,
}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("peer", choices=sorted(PEERS))
    cli.add_argument("--protocol", choices=["classic", "framed"], default="framed")
    cli.add_argument("--reply", choices=["static", "handler", "async"], default="static")
    cli.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="framesock-aio's event loop")
    cli.add_argument("--reply-size", type=int, default=0)
    cli.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    cli.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    cli.add_argument("--proxy-protocol", action="store_true", help="framesock: every connection starts with a PROXY header")
    cli.add_argument("--processes", type=int, default=1, help="asyncio/uvloop: this many processes, SO_REUSEPORT")
    cli.add_argument("--port", type=int, default=0, help="(used by --processes) serve this port with SO_REUSEPORT")
    options = cli.parse_args()
    try:
        if options.processes > 1:
            run_processes(options)
        else:
            PEERS[options.peer](options)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
