"""framesock for asyncio: the blocking API's names and arguments, as coroutines.

The network I/O runs in framesock's Rust engine, off the event loop; each call hands the loop an
awaitable that completes when the engine is done, so the loop never blocks on the network.
Cancelling a task (or ``asyncio.wait_for`` timing out) raises ``CancelledError`` in it at once.
A framed request already handed to the engine is still written whole and its reply read and
dropped, so the connection stays in step for the requests after it; a cancelled classic
request's connection is closed.

    import asyncio
    from framesock import aio

    async def handler(request):
        await asyncio.sleep(0)          # coroutine handlers run on this event loop
        return {"echo": request}

    async def main():
        async with aio.Server(handler, port=0, protocol="framed") as server:
            async with aio.Client(server.host, server.port, protocol="framed") as client:
                print(await client.request("hello"))

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, cast, overload

from framesock import _arguments, _framesock
from framesock.types import (
    Address,
    AsyncHandler,
    Exchange,
    JSONValue,
    Message,
    PathLike,
    Protocol,
    Reply,
    RequestAs,
    ServerStats,
)

__all__ = ["Client", "Server", "start_client", "start_server"]

_MAX_LEN = 16 * 1024 * 1024
# What exchanges in progress get when serve_forever() is cancelled (Ctrl-C under asyncio.run
# cancels it): as long as the blocking server gives them after Ctrl-C.
_CANCEL_GRACE = 0.1


@overload
async def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: Reply = None,
    *,
    handler: Optional[AsyncHandler[str]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = _MAX_LEN,
    backlog: int = 5,
    request_as: Literal["text"] = "text",
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[PathLike] = None,
    tls: Optional[_framesock.ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange: ...


@overload
async def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: Reply = None,
    *,
    handler: Optional[AsyncHandler[bytes]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = _MAX_LEN,
    backlog: int = 5,
    request_as: Literal["bytes"],
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[PathLike] = None,
    tls: Optional[_framesock.ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange: ...


@overload
async def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: Reply = None,
    *,
    handler: Optional[AsyncHandler[Any]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = _MAX_LEN,
    backlog: int = 5,
    request_as: Literal["json"],
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[PathLike] = None,
    tls: Optional[_framesock.ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange: ...


async def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: Reply = None,
    *,
    handler: Optional[AsyncHandler[Any]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = _MAX_LEN,
    backlog: int = 5,
    request_as: RequestAs = "text",
    ready: Optional[Callable[[Any], object]] = None,
    path: Optional[PathLike] = None,
    tls: Optional[_framesock.ServerTLS] = None,
    proxy_protocol: bool = False,
    proxy_from: Optional[Sequence[str]] = None,
) -> Exchange:
    """Serve one client and one request, like ``framesock.start_server``.

    ``handler`` may be a plain function or a coroutine function (run on this event loop);
    ``ready(address)`` is called on this event loop once the socket listens.
    """
    return await _framesock.start_server_async(
        host, port, response, handler, timeout, max_frame, backlog, request_as, ready, path, tls,
        proxy_protocol, _listed_proxy_from(proxy_from),
    )


async def start_client(
    host: Optional[str] = "127.0.0.1",
    port: Optional[int] = 8000,
    message: Message = "msg from client",
    *,
    timeout: Optional[float] = 20.0,
    max_reply: int = _MAX_LEN,
    path: Optional[PathLike] = None,
    tls: Optional[_framesock.ClientTLS] = None,
) -> JSONValue:
    """Send one request like ``framesock.start_client`` and return the decoded reply."""
    async with Client(host, port, path=path, timeout=timeout, max_reply=max_reply, tls=tls) as client:
        return await client.request(message)


def _listed_proxy_from(given: Optional[Sequence[str]]) -> Optional[List[str]]:
    _arguments.check("proxy_from", given, _arguments.STRINGS_OR_NONE)
    return None if given is None else list(given)


_MAX_RETRIES = 100
_BACKOFF_FIRST = 0.05
_BACKOFF_MOST = 2.0
_log = logging.getLogger("framesock.client")


def _retries(given: object) -> int:
    """``retries``, checked as the blocking ``Client`` checks it."""
    _arguments.check("retries", given, _arguments.INT)
    assert isinstance(given, int)
    if not 0 <= given <= _MAX_RETRIES:
        raise ValueError(f"retries must be in 0..{_MAX_RETRIES}, got {given}")
    return given


class _Failover:
    """A client's addresses tried in turn, as ``framesock.Client`` does (``engine/failover.rs``):
    from a random one; a request no server saw (``request_sent`` is False on the exception) goes
    to the next address at once; one whose connection broke goes again only if idempotent;
    between rounds, up to ``retries``, an exponential backoff with full jitter, within
    ``timeout`` from the first try."""

    def __init__(self, count: int, retries: int, timeout: Optional[float], idempotent: bool) -> None:
        self.count = count
        self.current = random.randrange(count)
        self.retries = retries
        self.timeout = timeout
        self.idempotent = idempotent
        self.closed = False
        self.stats = {"retries": 0, "failovers": 0}

    def advance(self, index: int) -> None:
        if self.count > 1 and self.current == index:
            self.current = (index + 1) % self.count
            self.stats["failovers"] += 1

    async def tried(self, call: Callable[[int], Awaitable[Any]], idempotent: Optional[bool]) -> Any:
        if idempotent is None:
            idempotent = self.idempotent
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        refused = rounds = 0
        while True:
            index = self.current
            try:
                return await call(index)
            except _framesock.RemoteError:
                raise  # the server answered
            except (OSError, _framesock.FramesockError) as err:
                never_sent = getattr(err, "request_sent", True) is False
                self.advance(index)
                if self.closed or not (never_sent or idempotent):
                    raise
                if never_sent:
                    refused += 1
                    if refused < self.count:
                        _log.debug("%s; trying the next address", err)
                        continue
                if rounds >= self.retries:
                    raise
                rounds += 1
                pause = random.uniform(0, min(_BACKOFF_MOST, _BACKOFF_FIRST * 2**rounds))
                if deadline is not None and loop.time() + pause > deadline:
                    raise
                _log.debug("%s; try %d of %d in %.3f s", err, rounds + 1, self.retries + 1, pause)
                self.stats["retries"] += 1
                refused = 0
                await asyncio.sleep(pause)


class Client:
    """``framesock.Client`` for asyncio.

    With ``protocol="framed"`` every request of this client shares one connection and
    concurrent ``request()`` calls are pipelined on it: each is written as soon as it is made
    and the replies come back in order. A cancelled request leaves the connection usable (its
    request is written whole, its reply read and dropped). The connection closes with
    ``close()``, when the client is dropped, or when the event loop it was used on is torn down.
    """

    def __init__(
        self,
        host: Optional[str] = "127.0.0.1",
        port: Optional[int] = 8000,
        *,
        path: Optional[PathLike] = None,
        protocol: Protocol = "classic",
        timeout: Optional[float] = 20.0,
        max_reply: int = _MAX_LEN,
        tls: Optional[_framesock.ClientTLS] = None,
        addresses: Optional[Sequence[Tuple[str, int]]] = None,
        retries: int = 0,
        idempotent: bool = False,
    ) -> None:
        _arguments.check("addresses", addresses, _arguments.ADDRESSES_OR_NONE)
        _arguments.check("idempotent", idempotent, _arguments.BOOL)
        if addresses is None:
            targets: List[Tuple[Optional[str], Optional[int], Optional[PathLike]]] = [(host, port, path)]
        else:
            targets = [(address_host, address_port, None) for address_host, address_port in addresses]
            if not targets:
                raise ValueError("addresses is empty: give at least one (host, port)")
        self._engines = [
            _framesock.AsyncClient(target_host, target_port, target_path, protocol, timeout, max_reply, tls)
            for target_host, target_port, target_path in targets
        ]
        self._failover = _Failover(len(self._engines), _retries(retries), timeout, idempotent)

    @property
    def _engine(self) -> _framesock.AsyncClient:
        return self._engines[self._failover.current]

    async def request(self, message: Message, *, idempotent: Optional[bool] = None) -> JSONValue:
        """Send one message and return the decoded reply (``RemoteError`` for an error reply).
        ``idempotent`` (default: the client's): whether it may be sent again after its
        connection broke (see ``retries``)."""
        if idempotent is not None:
            _arguments.check("idempotent", idempotent, _arguments.BOOL)
        if len(self._engines) == 1 and not self._failover.retries:
            return await self._engine.request(message)
        return await self._failover.tried(lambda index: self._engines[index].request(message), idempotent)

    async def request_many(self, messages: Iterable[Message], *, idempotent: Optional[bool] = None) -> List[JSONValue]:
        """Send every message and return the replies in order (pipelined in ``"framed"``)."""
        if idempotent is not None:
            _arguments.check("idempotent", idempotent, _arguments.BOOL)
        batch = list(messages)
        return await self._failover.tried(lambda index: self._engines[index].request_many(batch), idempotent)  # type: ignore[no-any-return]

    def stats(self) -> Dict[str, int]:
        """``retries`` (rounds tried again after a backoff) and ``failovers`` (moves to the
        next address), as ``framesock.Client.stats()``."""
        return dict(self._failover.stats)

    async def close(self) -> None:
        """Close the connection; later requests raise ValueError."""
        self._failover.closed = True
        for engine in self._engines:
            engine.close()

    def __repr__(self) -> str:
        return repr(self._engine).replace("<framesock.AsyncClient ", "<framesock.aio.Client ", 1)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Server:
    """``framesock.Server`` for asyncio.

    The socket is bound when the object is made. ``handler`` may be a plain function (called
    on the server's handler threads, as with the blocking ``Server``) or a coroutine function:
    its coroutines run as Tasks on the event loop that called ``start()``, many requests' at
    once. When that loop is torn down (``asyncio.run()`` returning) without ``shutdown()``, the
    server shuts down: it stops accepting and drops its connections.
    """

    @overload
    def __init__(
        self,
        handler: Optional[AsyncHandler[str]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[PathLike] = None,
        response: Reply = None,
        protocol: Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = _MAX_LEN,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["text"] = "text",
        handler_threads: Optional[int] = None,
        max_unsent: int = 64 * 1024,
        max_buffered: int = 256 * 1024 * 1024,
        tls: Optional[_framesock.ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        handler: Optional[AsyncHandler[bytes]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[PathLike] = None,
        response: Reply = None,
        protocol: Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = _MAX_LEN,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["bytes"],
        handler_threads: Optional[int] = None,
        max_unsent: int = 64 * 1024,
        max_buffered: int = 256 * 1024 * 1024,
        tls: Optional[_framesock.ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        handler: Optional[AsyncHandler[Any]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[PathLike] = None,
        response: Reply = None,
        protocol: Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = _MAX_LEN,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: Literal["json"],
        handler_threads: Optional[int] = None,
        max_unsent: int = 64 * 1024,
        max_buffered: int = 256 * 1024 * 1024,
        tls: Optional[_framesock.ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> None: ...

    def __init__(
        self,
        handler: Optional[AsyncHandler[Any]] = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        path: Optional[PathLike] = None,
        response: Reply = None,
        protocol: Protocol = "classic",
        timeout: Optional[float] = 20.0,
        idle_timeout: Optional[float] = 75.0,
        max_frame: int = _MAX_LEN,
        max_connections: int = 1024,
        backlog: int = 1024,
        request_as: RequestAs = "text",
        handler_threads: Optional[int] = None,
        max_unsent: int = 64 * 1024,
        max_buffered: int = 256 * 1024 * 1024,
        tls: Optional[_framesock.ServerTLS] = None,
        max_connections_per_address: Optional[int] = None,
        fd: Optional[int] = None,
        io_threads: Optional[int] = None,
        proxy_protocol: bool = False,
        proxy_from: Optional[Sequence[str]] = None,
    ) -> None:
        # The engine's own typing knows plain handlers only; `_use_event_loop` runs the others.
        self._server = _framesock.Server(
            cast(Any, handler),
            host,
            port,
            path=path,
            response=response,
            protocol=protocol,
            timeout=timeout,
            idle_timeout=idle_timeout,
            max_frame=max_frame,
            max_connections=max_connections,
            backlog=backlog,
            request_as=cast(Any, request_as),
            handler_threads=handler_threads,
            max_unsent=max_unsent,
            max_buffered=max_buffered,
            tls=tls,
            max_connections_per_address=max_connections_per_address,
            fd=fd,
            io_threads=io_threads,
            proxy_protocol=proxy_protocol,
            proxy_from=_listed_proxy_from(proxy_from),
        )

    @property
    def address(self) -> Address:
        """The bound address: ``(host, port)`` (IPv6: 4-tuple) or the Unix socket path."""
        return self._server.address

    @property
    def host(self) -> Optional[str]:
        """The bound host as text; None for a Unix socket."""
        return self._server.host

    @property
    def port(self) -> Optional[int]:
        """The bound port (the real one when bound with port 0); None for a Unix socket."""
        return self._server.port

    @property
    def path(self) -> Optional[str]:
        """The Unix socket path; None for TCP."""
        return self._server.path

    async def start(self) -> None:
        """Start serving in the background; coroutine handlers run on the running loop."""
        self._server._use_event_loop()
        self._server.start()

    async def serve_forever(self) -> None:
        """Serve until ``shutdown()``. Cancelling the task (Ctrl-C under ``asyncio.run`` does)
        shuts the server down promptly: exchanges in progress get 0.1 s, then their handlers'
        Tasks are cancelled. For a graceful stop, await ``shutdown()`` instead."""
        await self.start()
        try:
            await self._server._finished()
        except asyncio.CancelledError:
            await asyncio.shield(self.shutdown(_CANCEL_GRACE))
            raise
        why = self._server._failure()
        if why is not None:
            raise RuntimeError(f"the server stopped: {why}")

    async def shutdown(self, timeout: Optional[float] = 5.0) -> None:
        """Stop accepting, let exchanges in progress finish (up to ``timeout``), close all.

        From inside a handler, start it without awaiting it
        (``asyncio.get_running_loop().create_task(server.shutdown())``): awaiting would wait for
        the handler's own exchange.
        """
        await self._server._shutdown_async(timeout)

    def stats(self) -> ServerStats:
        """The same counters as ``framesock.Server.stats()``."""
        return self._server.stats()

    def drain(self) -> None:
        """Mark the server as draining: it serves on, its health endpoint answers 503."""
        self._server.drain()

    @property
    def draining(self) -> bool:
        """Whether ``drain()`` or ``shutdown()`` has begun."""
        return self._server.draining

    def __repr__(self) -> str:
        return repr(self._server).replace("<framesock.Server ", "<framesock.aio.Server ", 1)

    async def __aenter__(self) -> "Server":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

