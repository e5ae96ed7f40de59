"""The listening sockets the supervisor makes before any worker starts, with Python's socket
module: the supervisor never starts framesock's engine, so it has no I/O threads to carry.

TCP: one socket per worker slot, all on one port with SO_REUSEPORT, so the kernel spreads new
connections evenly over the slots (with one shared socket, the worker that happens to be awake
took them: 32 of 32 connections to one of two workers in a benchmark round). The supervisor keeps
every slot's socket open, so connections waiting in a slot's queue while its worker is replaced
or restarted wait for the next worker of that slot instead of being reset (the kernel resets a
closed SO_REUSEPORT socket's queue unless net.ipv4.tcp_migrate_req is on). A Unix socket cannot
be shared out that way: there every worker takes from one socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional


def listen(host: str, port: int, path: Optional[str], backlog: int, slots: int) -> list[socket.socket]:
    """``slots`` listening TCP sockets on one port of ``host``'s first address (SO_REUSEADDR as
    ``Server`` binds, and SO_REUSEPORT), or one Unix socket at ``path`` (a stale socket file left
    by a server that is gone is replaced)."""
    if path is not None:
        return [listen_unix(path, backlog)]
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(slots):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if slots > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            # With port 0 the first socket picks the port; the others join it there.
            address = sock.getsockname()
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
