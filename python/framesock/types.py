"""The types of framesock's API, for annotating code that uses it
(``from framesock.types import ServerStats``); the blocking API's stubs and ``framesock.aio``
are written in them. Everything here exists at run time too.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Dict, List, Literal, Mapping, Sequence, Tuple, TypedDict, TypeVar, Union

__all__ = [
    "Address",
    "AsyncHandler",
    "ErrorCounts",
    "Exchange",
    "Handler",
    "JSONValue",
    "Message",
    "Reply",
    "PathLike",
    "Protocol",
    "RequestAs",
    "ServerStats",
]

#: A decoded JSON value (what ``json.loads`` returns): dict, list, str, int, float, bool or
#: None. ``Any``, as ``json.loads`` gives it: the caller knows the shape it expects and says it
#: in its own annotation (``reply: dict[str, int] = client.request(...)``); a union would make
#: every use of a reply need a cast or an ``isinstance`` first.
JSONValue = Any

#: What a handler may return (and ``response=`` serve): what ``json.dumps`` encodes, as
#: read-only shapes, so ``dict[str, int]``, ``list[str]``, tuples and nested literals all fit
#: while a ``set``, an arbitrary object or a coroutine (from a plain handler) is an error in the
#: editor. Keys are ``str`` (``json.dumps`` also takes int, float, bool and None keys, written
#: as text; annotate such a dict ``dict[str, ...]`` or ``Any``). One hole: ``bytes`` is a
#: ``Sequence[int]`` to a type checker, though ``json.dumps`` refuses it (so does framesock).
Reply = Union[Mapping[str, "Reply"], Sequence["Reply"], str, int, float, bool, None]

#: The request a handler is given: ``str`` for ``request_as="text"``, ``bytes`` for ``"bytes"``
#: and, for ``"json"``, what ``json.loads`` gives (``Any``: annotate the shape expected).
RequestT = TypeVar("RequestT")

#: A handler: ``handler(request)`` or ``handler(request, caller)`` (a ``framesock.Caller``,
#: typed ``Any`` here to keep this module free of the engine) returning the reply.
#: ``Handler[str]`` is one for ``request_as="text"``, ``Handler[bytes]`` for ``"bytes"``,
#: ``Handler[Any]`` for ``"json"``.
Handler = Union[Callable[[RequestT], Reply], Callable[[RequestT, Any], Reply]]

#: A ``framesock.aio`` handler: a plain function as above, or a coroutine function whose
#: result is the reply.
AsyncHandler = Union[
    Callable[[RequestT], Union[Reply, Awaitable[Reply]]],
    Callable[[RequestT, Any], Union[Reply, Awaitable[Reply]]],
]

#: What a request may be: str and bytes go as they are; any other value as its JSON text.
Message = Union[str, bytes, bytearray, Reply]

#: ``"classic"``: one request per connection, the reply is raw JSON ended by the close (the
#: seed's). ``"framed"``: replies framed like requests, kept connections, pipelining.
Protocol = Literal["classic", "framed"]

#: What a handler receives: ``"text"`` (str), ``"bytes"`` or ``"json"`` (the decoded value).
RequestAs = Literal["text", "bytes", "json"]

#: A socket address as Python's ``socket`` module gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6, the path for a Unix socket. For one kind at a
#: time, ``Server.host``, ``Server.port`` and ``Server.path`` are simpler.
Address = Union[Tuple[str, int], Tuple[str, int, int, int], str]

#: A Unix socket path (``"\0name"`` for an abstract one on Linux).
PathLike = Union[str, "os.PathLike[str]"]


class ErrorCounts(TypedDict):
    """``ServerStats["errors"]``: failed exchanges and connections, by kind."""

    handler: int
    encode: int
    bad_request: int
    frame_too_large: int
    timeout: int
    disconnected: int
    io: int
    internal: int
    tls: int
    proxy: int


class DurationHistogram(TypedDict):
    """``ServerStats["request_duration_seconds"]``: seconds from a request's last byte to its
    reply's first byte written. ``buckets`` maps each upper bound (``"0.0001"`` to ``"10.0"``, then
    ``"+Inf"``) to the requests at or below it, as Prometheus counts them."""

    buckets: Dict[str, int]
    count: int
    sum: float


class ServerStats(TypedDict):
    """What ``Server.stats()`` returns: counters since the server was made."""

    connections_accepted: int
    connections_active: int
    connections_empty: int
    requests: int
    bytes_in: int
    bytes_out: int
    bytes_buffered: int
    idle_closed: int
    idle_evicted: int
    stalled_evicted: int
    address_refused: int
    busy: int
    requests_in_progress: int
    handler_calls_waiting: int
    request_duration_seconds: DurationHistogram
    errors: ErrorCounts


class _ExchangeSometimes(TypedDict, total=False):
    tls_subject: str
    tls_alt_names: List[str]
    proxy_address: Address


class Exchange(_ExchangeSometimes):
    """What ``start_server()`` returns: the one exchange it served. Under mutual TLS it also
    holds the client certificate's ``tls_subject`` and ``tls_alt_names``; under the PROXY
    protocol, ``peer`` is the client the balancer named and ``proxy_address`` the balancer."""

    peer: Address
    address: Address
    request: str
    request_bytes: bytes
    reply: JSONValue
