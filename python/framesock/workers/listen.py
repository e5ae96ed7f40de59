"""The listening socket the supervisor makes before any worker starts, with Python's socket
module: the supervisor never starts framesock's engine, so it has no I/O threads to carry."""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional


def listen(host: str, port: int, path: Optional[str], backlog: int) -> socket.socket:
    """A listening TCP socket on ``host``'s first address (SO_REUSEADDR, as ``Server`` binds),
    or a Unix socket at ``path`` (a stale socket file left by a server that is gone is replaced)."""
    if path is not None:
        return listen_unix(path, backlog)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_unix(path: str, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as err:
            if err.errno != errno.EADDRINUSE or not is_stale(path):
                raise
            os.unlink(path)
            sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def is_stale(path: str) -> bool:
    """Whether ``path`` is a socket file nothing listens on."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def socket_file(sock: socket.socket) -> Optional[tuple[str, int, int]]:
    """A Unix socket's file and its (device, inode), to remove it at the end if still ours."""
    if sock.family != socket.AF_UNIX:
        return None
    name = sock.getsockname()
    if not isinstance(name, str) or not name or name.startswith("\0"):
        return None
    info = os.lstat(name)
    return name, info.st_dev, info.st_ino


def remove_socket_file(file: Optional[tuple[str, int, int]]) -> None:
    if file is None:
        return
    name, dev, ino = file
    try:
        info = os.lstat(name)
        if (info.st_dev, info.st_ino) == (dev, ino):
            os.unlink(name)
    except OSError:
        pass
