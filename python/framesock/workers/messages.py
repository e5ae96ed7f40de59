"""What a worker tells its supervisor: one JSON object per line on a pipe.

``{"ready": true}`` once it serves; ``{"stats": {...}}`` every second and at the end;
``{"failed": "why"}`` when the app cannot be loaded (the worker then exits with status 3);
``{"recycle": true}`` when it has served ``--max-requests``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

# What one line may hold at most (a failure's traceback is the longest message).
MAX_LINE = 256 * 1024


def send(fd: int, **message: Any) -> None:
    """Writes one message (a pipe write this small is atomic below PIPE_BUF only; each worker
    has its own pipe, so lines never interleave)."""
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


class Reader:
    """Splits what arrives on a worker's pipe into messages."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """The complete messages ``data`` finishes; a line too long or not JSON is dropped."""
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_LINE:
            self._pending = b""
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                yield message
