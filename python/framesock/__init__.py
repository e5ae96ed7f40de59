"""framesock: length-prefixed JSON messages over TCP, with a Rust engine.

A drop-in replacement for the tutorial's socket scripts: ``start_server()`` serves one request
framed as a 4-byte big-endian length plus payload and answers with JSON; ``start_client()`` sends
one and returns the decoded reply.
"""

from framesock._framesock import (
    ConnectionClosedError,
    FramesockError,
    FramesockTimeoutError,
    FrameTooLargeError,
    JSONDecodeError,
    __version__,
    start_client,
    start_server,
)

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
