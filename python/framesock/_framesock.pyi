"""Type stubs for framesock's native engine (``framesock._framesock``)."""

import json
from typing import Any, Callable, Literal, Optional, Union

__version__: str
__all__ = [
    "ConnectionClosedError",
    "FrameTooLargeError",
    "FramesockError",
    "FramesockTimeoutError",
    "JSONDecodeError",
    "__version__",
    "start_client",
    "start_server",
]

_JSONValue = Any
_Address = Union[tuple[str, int], tuple[str, int, int, int]]

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

class FramesockTimeoutError(FramesockError, TimeoutError):
    """A network step took longer than its timeout; the message names the step."""

def start_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    response: Optional[_JSONValue] = None,
    *,
    handler: Optional[Callable[[Any], _JSONValue]] = None,
    timeout: Optional[float] = 20.0,
    max_frame: int = 16777216,
    backlog: int = 5,
    request_as: Literal["text", "bytes", "json"] = "text",
    ready: Optional[Callable[[_Address], object]] = None,
) -> dict[str, Any]:
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

    Returns:
        A dict with ``peer`` (the client's address), ``address`` (the bound address),
        ``request`` (str), ``request_bytes`` (the raw payload) and ``reply`` (the value sent).

    Raises:
        FrameTooLargeError: The header declared more than ``max_frame`` bytes.
        ConnectionClosedError: The client left mid-frame or before sending anything.
        FramesockTimeoutError: A step outlived ``timeout``.
        JSONDecodeError: ``request_as="json"`` and the request is not JSON.
        OSError: The address could not be bound (e.g. address in use).
        TypeError: Bad argument types, both ``response`` and ``handler``, or a reply value that
            is not JSON-serialisable. Whatever ``handler`` raises propagates unchanged.
        ValueError: Argument values out of range.
    """

def start_client(
    host: str = "127.0.0.1",
    port: int = 8000,
    message: Union[str, bytes, bytearray, dict[str, Any], list[Any]] = "msg from client",
    *,
    timeout: Optional[float] = 20.0,
    max_reply: int = 16777216,
) -> _JSONValue:
    """Send one request like the seed's client and return the decoded JSON reply.

    Connects, sends the header and payload in a single write, reads the reply until the server
    closes (any size up to ``max_reply``) and decodes it. The GIL is released while waiting and
    Ctrl-C interrupts the wait.

    Args:
        host: Server address (IPv4 or IPv6 literal, or a name).
        port: Server port, 0..65535.
        message: str (sent as UTF-8), bytes, or a dict/list (sent as JSON text); the default is
            the seed's ``"msg from client"``.
        timeout: Seconds for each step: connecting, sending the request, receiving the whole
            reply. None waits forever.
        max_reply: Largest reply accepted, in bytes.

    Returns:
        The reply decoded from JSON: a dict for an object, else the matching Python value.

    Raises:
        JSONDecodeError: The reply is not valid JSON (also a ``json.JSONDecodeError``).
        FrameTooLargeError: The reply is longer than ``max_reply``.
        ConnectionClosedError: The server closed without replying.
        FramesockTimeoutError: A step outlived ``timeout``.
        OSError: Connecting failed (``ConnectionRefusedError``, ``socket.gaierror``, ...).
        TypeError: ``message`` of an unsupported type.
        ValueError: Argument values out of range.
    """
