"""framesock: length-prefixed JSON messages over TCP, with a Rust engine.

A drop-in replacement for the tutorial's socket scripts: ``start_server()`` serves one request
framed as a 4-byte big-endian length plus payload and answers with JSON; ``start_client()`` sends
one and returns the decoded reply. ``Server`` serves many clients at once with Python handlers;
``Client`` keeps its connection and pipelines batches.
"""

from framesock._framesock import (
    Client,
    ConnectionClosedError,
    FramesockError,
    FramesockTimeoutError,
    FrameTooLargeError,
    JSONDecodeError,
    RemoteError,
    Server,
    __version__,
    start_client,
    start_server,
)

__all__ = [
    "Client",
    "ConnectionClosedError",
    "FrameTooLargeError",
    "FramesockError",
    "FramesockTimeoutError",
    "JSONDecodeError",
    "RemoteError",
    "Server",
    "__version__",
    "start_client",
    "start_server",
]
