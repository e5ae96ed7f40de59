"""Type stubs for framesock's native engine (``framesock._framesock``)."""

import json
import ssl
from types import TracebackType
from typing import Any, Awaitable, Callable, Iterable, Literal, Optional, Sequence, Union, final, overload

from framesock.types import (
    Address as _Address,
    AsyncHandler,
    Exchange,
    Handler,
    JSONValue as _JSONValue,
    Message as _Message,
    PathLike as _Path,
    Protocol as _Protocol,
    Reply as _Reply,
    RequestAs as _RequestAs,
    ServerStats,
)

__version__: str
__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionClosedError",
    "ProtocolError",
    "Caller",
    "ClientTLS",
    "ServerTLS",
    "TLSError",
    "FrameTooLargeError",
    "FramesockError",
    "FramesockTimeoutError",
    "JSONDecodeError",
    "RemoteError",
    "Server",
    "__version__",
    "_after_fork_in_child",
    "_at_exit",
    "_json_dumps",
    "_json_loads",
    "start_client",
    "start_server",
    "start_server_async",
]

class FramesockError(Exception):
    """Base class of every error framesock raises itself."""

class FrameTooLargeError(FramesockError, ValueError):
    """A declared frame length (or an unframed reply) is over max_frame / max_reply.

    Raised from the 4-byte header alone, before any payload is read or buffered.
    """

class JSONDecodeError(FramesockError, json.JSONDecodeError):
    """Bytes that should be JSON are not; ``pos``, ``lineno`` and ``colno`` say where it broke."""

class ConnectionClosedError(FramesockError, ConnectionError):
    """The peer closed the connection mid-frame or before replying.

    The message says how many of how many bytes arrived.
    """

class ProtocolError(FramesockError, ConnectionError):
    """The peer does not speak the protocol asked for (a framed client talking to a classic
    server, or the reverse), or sent a reply that no request asked for. The connection is
    dropped; the next request opens a new one."""

class TLSError(FramesockError, ssl.SSLError):
    """A TLS handshake failed; the message says why in words (unknown issuer, name mismatch,
    expired, no client certificate, a peer that does not speak TLS)."""

@final
class Caller:
    """Who sent a request, for a handler that takes a second argument: ``handler(request,
    caller)``. Handlers that take one argument are called with the request alone."""

    @property
    def address(self) -> _Address:
        """The client's address: ``(host, port)`` (IPv6: 4-tuple) or a Unix socket path.
        Under the PROXY protocol, the client the balancer speaks for."""
    @property
    def proxy_address(self) -> Optional[_Address]:
        """Under the PROXY protocol, the balancer's address (the connection's own peer);
        None without it."""
    @property
    def tls_subject(self) -> Optional[str]:
        """The subject of the client's verified certificate (mutual TLS), RFC 4514 style."""
    @property
    def tls_alt_names(self) -> list[str]:
        """The certificate's alternative names: ``"DNS:..."``, ``"IP:..."``, ``"email:..."``."""
    @property
    def tls_certificate(self) -> Optional[bytes]:
        """The client's certificate (DER); None without mutual TLS."""

@final
class ServerTLS:
    """A server's TLS settings (rustls, TLS 1.2 and 1.3); immutable, reusable.

    ``cert`` is the certificate chain and ``key`` the private key, each a path or PEM bytes;
    with ``client_ca`` (path or PEM bytes) clients must present a certificate that chains to
    it (mutual TLS). Problems raise ``ValueError`` naming the input, when the object is made.
    """

    def __new__(
        cls,
        cert: Union[_Path, bytes],
        key: Union[_Path, bytes],
        *,
        client_ca: Union[_Path, bytes, None] = None,
    ) -> "ServerTLS": ...
    @property
    def requires_client_certificate(self) -> bool: ...

@final
class ClientTLS:
    """A client's TLS settings; immutable, reusable.

    ``ca``: the CA bundle server certificates must chain to (path or PEM bytes; None: the
    system's). ``cert``/``key``: a client certificate to present. ``server_name``: the name to
    check the server's certificate against (default: the host connected to; an IP address is
    checked as an IP SAN).
    """

    def __new__(
        cls,
        ca: Union[_Path, bytes, None] = None,
        *,
        cert: Union[_Path, bytes, None] = None,
        key: Union[_Path, bytes, None] = None,
        server_name: Optional[str] = None,
    ) -> "ClientTLS": ...
    @property
    def server_name(self) -> Optional[str]: ...

class FramesockTimeoutError(FramesockError, TimeoutError):
    """A network step took longer than its timeout; the message names the step."""

class RemoteError(FramesockError):
    """The server answered with an error reply (framed protocol).

    ``kind`` says what failed on the server: ``"handler"`` (the handler raised), ``"encode"``
    (its value is not JSON-serialisable), ``"bad_request"`` (``request_as="json"`` and the
    request is not JSON) or ``"frame_too_large"``; ``remote_message`` is the server's text.
    """

    kind: str
    remote_message: str

@overload
def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: _Reply = None,
    *,
    handler: Optional[Handler[bytes]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = 16777216,
    backlog: int = 5,
    request_as: Literal["bytes"],
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[_Path] = None,
    tls: Optional[ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange: ...
@overload
def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: _Reply = None,
    *,
    handler: Optional[Handler[Any]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = 16777216,
    backlog: int = 5,
    request_as: Literal["json"],
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[_Path] = None,
    tls: Optional[ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange: ...
@overload
def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: _Reply = None,
    *,
    handler: Optional[Handler[str]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = 16777216,
    backlog: int = 5,
    request_as: Literal["text"] = "text",
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[_Path] = None,
    tls: Optional[ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange:
    """Serve one client and one request, like the seed's server, then close and return.

    Binds ``host:port`` with SO_REUSEADDR, accepts one connection, reads one frame (4-byte
    big-endian length + payload), sends the reply as JSON text and closes. The GIL is released
    while waiting and Ctrl-C interrupts the wait.

    Args:
        host: Address to bind (IPv4 or IPv6 literal, or a name).
        port: TCP port, 0..65535; 0 lets the OS pick (see ``ready``).
        response: Any JSON-serialisable value to reply with; None means the seed's
            ``{"key": "id", "val": 123}``.
        handler: ``handler(request) -> value`` called with the request instead of ``response``.
        timeout: Seconds for each step: receiving the whole request, sending the whole reply.
            None waits forever. Accepting the client has no timeout (as in the seed).
        max_frame: Largest request payload accepted, in bytes.
        backlog: Listen backlog.
        request_as: What ``handler`` receives: ``"text"`` (str, UTF-8 with invalid bytes
            replaced), ``"bytes"`` or ``"json"`` (the parsed value).
        ready: Called with the bound address once the server listens (useful with port 0).
        path: Listen on this Unix domain socket path instead of ``host``/``port``.
        proxy_protocol: The connection begins with a PROXY protocol header (see ``Server``).
        proxy_from: Where the header is taken from (see ``Server``).

    Returns:
        A dict with ``peer`` (the client's address), ``address`` (the bound address),
        ``request`` (str), ``request_bytes`` (the raw payload) and ``reply`` (the value sent);
        under the PROXY protocol also ``proxy_address`` (the balancer).

    Raises:
        FrameTooLargeError: The header declared more than ``max_frame`` bytes.
        ConnectionClosedError: The client left mid-frame or before sending anything.
        FramesockTimeoutError: A step outlived ``timeout``.
        ProtocolError: ``proxy_protocol=True`` and the connection came from outside
            ``proxy_from`` or did not begin with a valid PROXY header.
        JSONDecodeError: ``request_as="json"`` and the request is not JSON.
        OSError: The address could not be bound (e.g. address in use).
        TypeError: Bad argument types, both ``response`` and ``handler``, or a reply value of a
            type ``json.dumps`` cannot encode (a set, an object). Whatever ``handler`` raises
            propagates unchanged.
        ValueError: Argument values out of range, or a reply value holding NaN, an infinity or
            a circular reference (as ``json.dumps(value, allow_nan=False)`` refuses them).
    """

def start_client(
    host: Optional[str] = "127.0.0.1",
    port: Optional[int] = 8000,
    message: _Message = "msg from client",
    *,
    timeout: Optional[float] = 20.0,
    max_reply: int = 16777216,
    path: Optional[_Path] = None,
    tls: Optional[ClientTLS] = None,
) -> _JSONValue:
    """Send one request like the seed's client and return the decoded JSON reply.

    Connects, sends the header and payload in a single write, reads the reply until the server
    closes (any size up to ``max_reply``) and decodes it. The GIL is released while waiting and
    Ctrl-C interrupts the wait.

    Args:
        host: Server address (IPv4 or IPv6 literal, or a name).
        port: Server port, 0..65535.
        message: str (sent as UTF-8) or bytes (sent as they are); any other value (dict, list,
            tuple, int, float, bool, None) is sent as its JSON text, byte for byte what
            ``json.dumps`` writes. The default is the seed's ``"msg from client"``.
        timeout: Seconds for each step: connecting, sending the request, receiving the whole
            reply. None waits forever.
        max_reply: Largest reply accepted, in bytes.
        path: Connect to this Unix domain socket path instead of ``host``/``port``.

    Returns:
        The reply decoded from JSON: a dict for an object, else the matching Python value.

    Raises:
        JSONDecodeError: The reply is not valid JSON (also a ``json.JSONDecodeError``).
        FrameTooLargeError: The reply is longer than ``max_reply``.
        ConnectionClosedError: The server closed without replying.
        FramesockTimeoutError: A step outlived ``timeout``.
        OSError: Connecting failed (``ConnectionRefusedError``, ``socket.gaierror``, ...).
        TypeError: ``message`` that ``json.dumps`` cannot encode either (a set, an object).
        ValueError: ``message`` holds NaN or an infinity (not JSON), or a circular reference.
        ValueError: Argument values out of range.
    """

@final
class Server:
    """A concurrent server: many clients at once, the I/O on every core without the GIL.

    The socket is bound when the object is made (so ``address`` is known and "address in use"
    is raised here); ``start()`` or ``serve_forever()`` begin accepting. A static ``response``
    is served without ever taking the GIL; a ``handler`` is called once per request on one of
    the server's handler threads (at most ``handler_threads`` at once), never on the I/O
    threads: a handler that blocks delays only its own exchange.

    Failures cost one exchange or one connection, never the server: they are counted in
    ``stats()``, logged on the ``framesock`` logger, and in the framed protocol answered with an
    error reply (``RemoteError`` on the client) while the connection is still in step.
    """

    @overload
    def __new__(
        cls,
        handler: Optional[Handler[bytes]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[_Path] = None,
        response: _Reply = None,
        protocol: _Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = 16777216,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["bytes"],
        handler_threads: Optional[int] = None,
        max_unsent: int = 65536,
        max_buffered: int = 268435456,
        tls: Optional[ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> "Server": ...
    @overload
    def __new__(
        cls,
        handler: Optional[Handler[Any]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[_Path] = None,
        response: _Reply = None,
        protocol: _Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = 16777216,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["json"],
        handler_threads: Optional[int] = None,
        max_unsent: int = 65536,
        max_buffered: int = 268435456,
        tls: Optional[ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> "Server": ...
    @overload
    def __new__(
        cls,
        handler: Optional[Handler[str]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[_Path] = None,
        response: _Reply = None,
        protocol: _Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = 16777216,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["text"] = "text",
        handler_threads: Optional[int] = None,
        max_unsent: int = 65536,
        max_buffered: int = 268435456,
        tls: Optional[ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> "Server":
        """Bind the server.

        Args:
            handler: ``handler(request) -> value``; None serves ``response``.
            host: Address to bind (IPv4 or IPv6).
            port: TCP port; 0 lets the OS pick (read ``address``).
            path: Bind this Unix domain socket path instead of ``host``/``port``.
            response: Static reply value when there is no handler (None: the seed's reply).
            protocol: ``"classic"`` (one request per connection, raw JSON reply ended by the
                close) or ``"framed"`` (kept connections, framed replies, pipelining).
            timeout: Seconds a request may take from its first byte to its last, and each
                write of replies to be taken by the client. None: no limit for requests;
                writes then get ``idle_timeout``.
            idle_timeout: Seconds a kept connection may stay silent between requests (nginx
                keeps idle connections 75 s). None: no limit.
            max_frame: Largest request payload, in bytes.
            max_connections: Connections served at once. When it is reached, the connection
                idle longest (silent between requests) is closed to make room; with none idle,
                one stuck inside a request (no progress for 2 s) is; with neither, accepting
                waits.
            backlog: Listen backlog.
            request_as: What the handler receives: ``"text"``, ``"bytes"`` or ``"json"``.
            handler_threads: Most handler calls running at once (threads are started as
                needed, one kept in reserve). None: ``min(32, cores + 4)``, as
                ``concurrent.futures.ThreadPoolExecutor``.
            max_unsent: Reply bytes a connection may have waiting for the client to read;
                past it the connection reads no further request until they are taken
                (backpressure).
            max_buffered: Request bytes all connections together may hold (partly received
                or being answered). A request that would go past it is read and dropped and
                answered with a ``RemoteError`` of kind ``"busy"`` (framed), or its
                connection closed (classic).
            tls: TLS settings (``ServerTLS``); None serves plain TCP.
            max_connections_per_address: Connections one client IP address may have at
                once; more are refused as they come (framed: with the closing handshake).
                None: no limit (behind a load balancer every client has its address).
            fd: Serve a listening socket made elsewhere (a supervisor, systemd), by its file
                descriptor, instead of binding ``host``/``port`` or ``path``. The server
                listens on a duplicate; the descriptor, and a Unix socket's file, stay the
                caller's.
            io_threads: Threads doing the network I/O of the whole process (None: one per
                core). Takes effect when the first server or client of the process starts
                the engine; a different number after that is a ``ValueError``.
            proxy_protocol: Every connection begins with a PROXY protocol header (v1 or v2,
                as HAProxy's ``send-proxy``/``send-proxy-v2`` write it), read before anything
                else, TLS included, within 3 s (or ``timeout`` if shorter). The client it
                names becomes ``Caller.address`` and the address in log lines; the balancer's
                is ``Caller.proxy_address``. A v2 ``LOCAL`` or v1 ``UNKNOWN`` header (a
                balancer's own check) keeps the connection's address. A connection without
                a valid header is closed and counted in ``stats()["errors"]["proxy"]``.
            proxy_from: Addresses or CIDR ranges (``"10.0.0.0/8"``, ``"::1"``) whose
                connections may send the header; others are closed and counted as ``proxy``
                errors. Default: ``127.0.0.0/8`` and ``::1``. Unix socket peers are always
                taken. Only with ``proxy_protocol=True``.

        Raises:
            OSError: The address cannot be bound.
            TypeError: Both ``handler`` and ``response``, a handler that is not callable, or a
                response of a type ``json.dumps`` cannot encode (a set, an object).
            ValueError: Argument values out of range, or a response holding NaN, an infinity
                or a circular reference.
        """

    @property
    def address(self) -> _Address:
        """The bound address: ``(host, port)`` (IPv6: 4-tuple) or the Unix socket path."""
    @property
    def host(self) -> Optional[str]:
        """The bound host as text (``"127.0.0.1"``, ``"::1"``); None for a Unix socket."""
    @property
    def port(self) -> Optional[int]:
        """The bound port (the real one when bound with port 0); None for a Unix socket."""
    @property
    def path(self) -> Optional[str]:
        """The Unix socket path; None for TCP. ``Client(server.host, server.port,
        path=server.path)`` reaches any server."""

    def start(self) -> None:
        """Start serving in the background and return; does nothing if already serving.

        Raises:
            RuntimeError: The server was shut down.
        """

    def serve_forever(self) -> None:
        """Serve until ``shutdown()``; Ctrl-C shuts down (exchanges in progress get 0.1 s)
        and raises KeyboardInterrupt.

        Raises:
            RuntimeError: The server was shut down.
        """

    def shutdown(self, timeout: Optional[float] = 5.0) -> None:
        """Stop accepting at once, let in-flight exchanges finish, close every connection.

        Connections waiting between requests are closed at once, and a framed connection
        with more requests coming is closed as soon as the ones it has are answered (with the
        closing handshake: what it sent after is not handled, and framesock's clients send it
        again); exchanges in progress get up
        to ``timeout`` seconds, then are dropped (None: wait for them). Returns within about
        ``timeout`` whatever the handlers do: a handler still running is abandoned (its
        connection closed) and its thread left to finish on its own. Safe from any thread; from
        inside a handler it begins the shutdown and returns without waiting.
        """

    def _shutdown_async(self, timeout: Optional[float]) -> Awaitable[None]:
        """framesock.aio: ``shutdown`` as an awaitable."""
    def _finished(self) -> Awaitable[None]:
        """framesock.aio: completes once shutdown has finished."""
    def _pool_state(self) -> Optional[tuple[int, int, int, int, int, bool, bool]]:
        """Diagnosis only: the handler pool's counters."""
    def _failure(self) -> Optional[str]:
        """framesock.aio: why the server stopped on its own (an internal error), if it did."""
    def _use_event_loop(self) -> None:
        """framesock.aio: awaitables returned by the handler run on the running loop, and the
        server shuts down when that loop is torn down."""
    def stats(self) -> ServerStats:
        """Counters: ``connections_accepted``, ``connections_active``, ``connections_empty``, ``requests``,
        ``bytes_in``, ``bytes_out``, ``idle_closed`` and ``errors`` by kind (``handler``,
        ``encode``, ``bad_request``, ``frame_too_large``, ``timeout``, ``disconnected``, ``io``,
        ``internal``, ``tls``, ``proxy``); gauges (``requests_in_progress``,
        ``handler_calls_waiting``); and ``request_duration_seconds``, a histogram of the time
        from a request's last byte to its reply's first byte written (cumulative ``buckets``
        by upper bound, ``count``, ``sum``). ``framesock.metrics.text(server)`` gives them in
        the Prometheus text format.
        """
    def drain(self) -> None:
        """Mark the server as draining: it serves on as before, but a health endpoint on it
        (``framesock.health``) answers 503, so that balancers stop sending it connections
        before ``shutdown()``."""
    @property
    def draining(self) -> bool:
        """Whether ``drain()`` or ``shutdown()`` has begun."""

    def __enter__(self) -> "Server":
        """Start serving; the block's end shuts down (5 s grace; 0.1 s after Ctrl-C)."""

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]] = None,
        _exc_value: Optional[BaseException] = None,
        _traceback: Optional[TracebackType] = None,
    ) -> None: ...

@final
class Client:
    """A client; with ``protocol="framed"`` it keeps one connection and pipelines batches.

    Thread-safe: calls from several threads take turns on the one connection. After a broken
    connection the call raises, and the next request connects again.
    """

    def __new__(
        cls,
        host: Optional[str] = "127.0.0.1",
        port: Optional[int] = 8000,
        *,
        path: Optional[_Path] = None,
        protocol: _Protocol = "classic",
        timeout: Optional[float] = 20.0,
        max_reply: int = 16777216,
        tls: Optional[ClientTLS] = None,
        addresses: Optional[Sequence[tuple[str, int]]] = None,
        retries: int = 0,
        idempotent: bool = False,
    ) -> "Client":
        """Describe the server; nothing connects until the first request.

        Args:
            host: Server address (may be None when ``path`` is given).
            port: Server port (may be None when ``path`` is given).
            path: Connect to this Unix domain socket path instead.
            protocol: ``"classic"`` (a connection per request) or ``"framed"`` (one kept
                connection).
            timeout: Seconds for connecting and for each reply to arrive. None: no limit.
                Also bounds the retries of one request: none starts later than this after
                the first try.
            max_reply: Largest reply accepted, in bytes.
            addresses: Several servers, ``[(host, port), ...]`` (``host``/``port`` are then
                ignored), tried in turn from a random one: when a connection cannot be made
                the request goes to the next at once (it was never sent), and a broken
                connection moves the client on to the next.
            retries: Rounds tried again, after an exponential backoff with jitter (50 ms
                doubling, at most 2 s), when every address refused, or when a request marked
                idempotent lost its connection.
            idempotent: Whether every request is safe to send again after its connection
                broke (the server may have acted on it); ``request(..., idempotent=)`` decides
                per request.
        """

    @property
    def addresses(self) -> list[Any]:
        """The servers it connects to, in the order given."""
    def stats(self) -> dict[str, int]:
        """``retries`` (rounds tried again after a backoff) and ``failovers`` (moves to the
        next address) so far."""

    def request(self, message: _Message, *, idempotent: Optional[bool] = None) -> _JSONValue:
        """Send one message and return the decoded reply.

        Raises:
            RemoteError: The server answered with an error reply.
            ValueError: The client is closed.
            (and everything ``start_client`` raises; an exception raised because no
            connection could be made has ``request_sent`` set to False)
        """

    def request_many(self, messages: Iterable[_Message], *, idempotent: Optional[bool] = None) -> list[_JSONValue]:
        """Send every message and return the replies in order.

        In ``"framed"`` all frames are written while the replies are read (no deadlock however
        large the batch) and the replies are converted under one GIL acquisition. If any reply
        is an error reply, ``RemoteError`` is raised for the first one after all were read.
        """

    def close(self) -> None:
        """Close the connection; later requests raise ValueError."""

    def __enter__(self) -> "Client": ...
    def __exit__(
        self,
        *exc_info: Union[type[BaseException], BaseException, TracebackType, None],
    ) -> None: ...

# Hooks that framesock/__init__.py registers with atexit and os.register_at_fork.

def _json_loads(data: bytes) -> Any:
    """framesock's JSON decoder (for tests and measurements; not public API)."""

def _json_dumps(value: Any) -> bytes:
    """framesock's JSON encoder (for tests and measurements; not public API)."""

def _at_exit() -> None:
    """Close handler threads and event-loop bridges, then stop the engine's runtime."""

def _after_fork_in_child() -> None:
    """In a forked child: start a fresh engine on next use instead of the parent's."""

# The engine of framesock.aio (python/framesock/aio.py holds the documented API).

def start_server_async(
    host: str,
    port: int,
    response: _Reply,
    handler: Optional[AsyncHandler[Any]],
    timeout: Optional[float],
    max_frame: int,
    backlog: int,
    request_as: _RequestAs,
    ready: Optional[Callable[[Any], object]],
    path: Optional[_Path],
    tls: Optional[ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[list[str]] = None,
) -> Awaitable[Exchange]:
    """``start_server`` as an awaitable for the running event loop (see ``framesock.aio``)."""

@final
class AsyncClient:
    """The engine of ``framesock.aio.Client``: every method returns an awaitable."""

    def __new__(
        cls,
        host: Optional[str],
        port: Optional[int],
        path: Optional[_Path],
        protocol: _Protocol,
        timeout: Optional[float],
        max_reply: int,
        tls: Optional[ClientTLS] = None,
    ) -> "AsyncClient": ...
    def request(self, message: _Message) -> Awaitable[_JSONValue]:
        """An awaitable for the reply to one message."""
    def request_many(self, messages: Iterable[_Message]) -> Awaitable[list[_JSONValue]]:
        """An awaitable for the replies to every message."""
    def close(self) -> None:
        """Close the connection; later requests raise ValueError."""
