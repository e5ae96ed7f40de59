"""A program that uses every public name of framesock, written as a user would under strict
type checking.

``make lint`` checks it with ``mypy --strict`` and pyright (strict); the test suite runs it
(``test_typing.py``), so it is also proof that the types match what happens at run time.
``mistakes()`` is never run: each of its lines must be an error to both checkers (an
ignore comment that is not needed fails the lint), so the types keep catching them.

    python tests/typed_example.py CA_PEM CERT_PEM KEY_PEM
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import framesock
from framesock import (
    Caller,
    Client,
    ClientTLS,
    ConnectionClosedError,
    FramesockError,
    FramesockTimeoutError,
    FrameTooLargeError,
    JSONDecodeError,
    ProtocolError,
    RemoteError,
    Server,
    ServerTLS,
    TLSError,
    aio,
    start_client,
    start_server,
)
from framesock.types import Address, ErrorCounts, Exchange, JSONValue, Message, ServerStats


def handler(request: JSONValue, caller: Caller) -> JSONValue:
    if request == {"fail": True}:
        raise RuntimeError("asked to fail")
    where: Address = caller.address
    return {"echo": request, "from_tcp": isinstance(where, tuple), "subject": caller.tls_subject}


def blocking_api(tls_files: tuple[str, str, str]) -> None:
    with Server(handler, port=0, protocol="framed", request_as="json") as server:
        host: Optional[str] = server.host
        port: Optional[int] = server.port
        assert host == "127.0.0.1" and port is not None and server.path is None
        with Client(host, port, protocol="framed", timeout=5) as client:
            message: Message = {"n": 1}
            assert client.request(message) == {"echo": {"n": 1}, "from_tcp": True, "subject": None}
            replies: list[JSONValue] = client.request_many([1, 2])
            assert [reply["echo"] for reply in replies] == [1, 2]
            try:
                client.request({"fail": True})
                raise AssertionError("no RemoteError")
            except RemoteError as err:
                assert err.kind == "handler" and "asked to fail" in err.remote_message
        stats: ServerStats = server.stats()
        errors: ErrorCounts = stats["errors"]
        assert stats["requests"] == 4 and errors["handler"] == 1

    with tempfile.TemporaryDirectory() as folder:
        socket_path = str(Path(folder) / "example.sock")
        with Server(path=socket_path, response=[1, 2, 3]) as unix_server:
            # The same line reaches a TCP server and a Unix socket server.
            reply = start_client(unix_server.host, unix_server.port, path=unix_server.path)
            assert reply == [1, 2, 3] and unix_server.address == socket_path

    ca, cert, key = tls_files
    with Server(port=0, tls=ServerTLS(cert, key), protocol="framed") as tls_server:
        assert tls_server.port is not None
        with Client("127.0.0.1", tls_server.port, protocol="framed", tls=ClientTLS(ca)) as client:
            assert client.request("hi") == {"key": "id", "val": 123}
        try:  # the system's CAs do not know the test CA
            start_client("127.0.0.1", tls_server.port, "hi", tls=ClientTLS(None), timeout=5)
            raise AssertionError("no TLSError")
        except TLSError as err:
            assert "certificate" in str(err)

    # The seed's one-shot pair: the server answers one request, then returns what happened.
    ports: list[int] = []

    def ready(address: tuple[str, int]) -> None:
        ports.append(address[1])

    import threading

    results: list[Exchange] = []
    serving = threading.Thread(target=lambda: results.append(start_server(port=0, ready=ready)))
    serving.start()
    while not ports:
        pass
    assert start_client(port=ports[0]) == {"key": "id", "val": 123}
    serving.join()
    assert results[0]["request"] == "msg from client"

    # Every framesock error is a FramesockError and the builtin a caller would catch anyway.
    kinds: list[type[FramesockError]] = [
        ConnectionClosedError,
        FrameTooLargeError,
        FramesockTimeoutError,
        JSONDecodeError,
        ProtocolError,
        RemoteError,
        TLSError,
    ]
    assert all(issubclass(kind, FramesockError) for kind in kinds)
    assert framesock.__version__


async def asyncio_api() -> None:
    async def answer(request: JSONValue) -> JSONValue:
        await asyncio.sleep(0)
        return {"echo": request}

    async with aio.Server(answer, port=0, protocol="framed") as server:
        async with aio.Client(server.host, server.port, path=server.path, protocol="framed") as client:
            assert await client.request("a") == {"echo": "a"}
            assert await client.request_many(["b", "c"]) == [{"echo": "b"}, {"echo": "c"}]
        stats: ServerStats = server.stats()
        assert stats["requests"] == 3

    async with aio.Server(later, port=0, protocol="framed", request_as="json") as typed:
        async with aio.Client(typed.host, typed.port, path=typed.path, protocol="framed") as client:
            assert await client.request({"a": 1, "b": 2}) == [{"n": 2}]

    ports: list[int] = []
    one_shot = asyncio.ensure_future(aio.start_server(port=0, ready=lambda address: ports.append(address[1])))
    while not ports:
        await asyncio.sleep(0.01)
    assert await aio.start_client(port=ports[0]) == {"key": "id", "val": 123}
    exchange: Exchange = await one_shot
    assert exchange["request_bytes"] == b"msg from client"


# The README's annotated handler, as it is there (tests/test_readme.py checks that it is).
def inventory(request: Dict[str, Any]) -> Dict[str, List[str]]:  # for request_as="json"
    names = request.get("names", [])
    return {"found": [name for name in names if isinstance(name, str)]}


def inventory_as_a_set(request: Dict[str, Any]) -> Set[str]:
    names = request.get("names", [])
    return {name for name in names if isinstance(name, str)}


def shout(request: str, caller: Caller) -> Tuple[str, Optional[str]]:
    return request.upper(), caller.tls_subject


def raw(request: bytes) -> int:
    return len(request)


async def later(request: Dict[str, Any]) -> Sequence[Mapping[str, int]]:
    await asyncio.sleep(0)
    return [{"n": len(request)}]


def returns_a_set(request: str) -> Set[str]:
    return {request}


class Thing:
    pass


def returns_an_object(request: str) -> Thing:
    return Thing()


def typed_handlers() -> None:
    """Handlers typed by ``request_as``: each one fits the server it is given to."""
    with Server(inventory, port=0, request_as="json", protocol="framed") as server:
        with Client(server.host, server.port, protocol="framed") as client:
            reply: Dict[str, List[str]] = client.request({"names": ["a", 1, "b"]})
            assert reply == {"found": ["a", "b"]}
    with Server(shout, port=0) as server:
        assert start_client(server.host, server.port, "hi") == ["HI", None]
    with Server(raw, port=0, request_as="bytes") as server:
        assert start_client(server.host, server.port, b"\xff\x00") == 2
    with Server(lambda request: {"length": len(request)}, port=0) as server:
        assert start_client(server.host, server.port, "abc") == {"length": 3}


def mistakes() -> None:
    """Never run; each line is an error to both checkers (see the module docstring)."""
    Server(protocol="framde")  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    aio.Client(protocol="framde")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    aio.Server(request_as="dict")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    Server(port=0).stats()["request"]  # type: ignore[typeddict-item]  # pyright: ignore[reportGeneralTypeIssues]
    start_server(port="8000")  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    framesock.run(42)  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    # A reply json.dumps cannot encode: a set, an object; a coroutine from a plain handler.
    Server(returns_a_set)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    Server(returns_an_object)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    Server(later, request_as="json")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    Server(inventory_as_a_set, request_as="json")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    Server(response={1, 2})  # type: ignore[call-overload]  # pyright: ignore[reportArgumentType]
    # A handler for another request_as than the server's.
    Server(raw)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    Server(shout, request_as="bytes")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    aio.Server(raw, request_as="text")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    start_server(handler=raw)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    framesock.run(raw, request_as="text")  # type: ignore[call-overload]  # pyright: ignore[reportCallIssue, reportArgumentType]
    aio.Server(returns_a_set)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    # A message that is not JSON.
    start_client(message={1, 2})  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def main() -> None:
    ca, cert, key = sys.argv[1:4]
    blocking_api((ca, cert, key))
    typed_handlers()
    asyncio.run(asyncio_api())
    print("typed example: ok")


if __name__ == "__main__":
    main()
