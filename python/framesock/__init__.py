"""framesock: length-prefixed JSON messages over TCP, with a Rust engine.

A drop-in replacement for the tutorial's socket scripts: ``start_server()`` serves one request
framed as a 4-byte big-endian length plus payload and answers with JSON; ``start_client()`` sends
one and returns the decoded reply. ``Server`` serves many clients at once with Python handlers;
``Client`` keeps its connection and pipelines batches.
"""

import atexit
import logging
import os

from framesock import _framesock
from framesock._framesock import (
    Caller,
    Client,
    ConnectionClosedError,
    ProtocolError,
    ClientTLS,
    FramesockError,
    FramesockTimeoutError,
    FrameTooLargeError,
    JSONDecodeError,
    RemoteError,
    Server,
    ServerTLS,
    TLSError,
    __version__,
    start_client,
    start_server,
)
from framesock.workers.run import run

# Submodules that are attributes of the package once it is imported, as their names promise
# (`framesock.aio.Server`, `framesock.types.Reply`); importing them starts nothing.
from framesock import aio, types  # noqa: E402  (after the engine's names, which they use)

__all__ = [
    "Caller",
    "Client",
    "ConnectionClosedError",
    "ProtocolError",
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
    "aio",
    "start_client",
    "run",
    "start_server",
    "types",
]

# The library convention: records go nowhere until the application configures logging. Importing
# logging here, on the importing thread, also keeps it from being first imported on a handler
# thread, which Python 3.9-3.12 would then take for the main thread and wait for at exit.
logging.getLogger("framesock").addHandler(logging.NullHandler())

# Stop the engine's Python-facing work before the interpreter finalizes (atexit runs first), and
# give a forked child a fresh engine instead of the parent's, whose threads it does not have.
atexit.register(_framesock._at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_framesock._after_fork_in_child)
