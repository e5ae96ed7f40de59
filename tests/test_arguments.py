"""Every argument of every public entry point, given a value of the wrong type, names itself in
the error: ``port must be an int, got str '8000'``, before anything touches the network.
(pytest's ``match`` also reads exception notes, where pyo3 names the argument on 3.11+: the
patterns here are anchored at the start only, and the walk reads ``str()``, which has no notes.)

The walk reads each entry point's signature, so an argument added later is walked too."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path

import pytest

import framesock
from framesock import aio, health


class Odd:
    """A value no argument takes."""

    def __repr__(self) -> str:
        return "<odd>"


ENTRY_POINTS = {
    "Server": framesock.Server,
    "Client": framesock.Client,
    "start_server": framesock.start_server,
    "start_client": framesock.start_client,
    "ServerTLS": framesock.ServerTLS,
    "ClientTLS": framesock.ClientTLS,
    "aio.Server": aio.Server,
    "aio.Client": aio.Client,
    "aio.start_server": aio.start_server,
    "aio.start_client": aio.start_client,
    "run": framesock.run,
    "HealthEndpoint": health.HealthEndpoint,
}
# What an entry point needs besides the argument under test, so that only that one is wrong.
NEEDED = {
    "ServerTLS": {"cert": b"not used", "key": b"not used"},
    "run": {"app": "no_such_module:handler"},
}


def parameter_names(entry) -> list[str]:
    """The entry point's parameters, from its signature; for the engine's classes on 3.9, whose
    abi3 types carry none, from the stub (which ``make lint``'s stubtest holds to the engine)."""
    try:
        return [
            parameter.name
            for parameter in inspect.signature(entry).parameters.values()
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]
    except ValueError:
        stub = ast.parse((Path(framesock.__file__).parent / "_framesock.pyi").read_text())
        found = next(node for node in stub.body if isinstance(node, ast.ClassDef) and node.name == entry.__name__)
        new = next(node for node in found.body if isinstance(node, ast.FunctionDef) and node.name == "__new__")
        return [argument.arg for argument in new.args.args[1:] + new.args.kwonlyargs]


def arguments():
    for label, entry in ENTRY_POINTS.items():
        for name in parameter_names(entry):
            yield pytest.param(label, name, id=f"{label}({name})")


def call(label: str, **kwargs):
    if label == "HealthEndpoint" and "source" not in kwargs:
        with framesock.Server(port=0) as source:  # a real source: only `address` is wrong
            return ENTRY_POINTS[label](source=source, **kwargs)
    outcome = ENTRY_POINTS[label](**kwargs)
    if inspect.iscoroutine(outcome):
        asyncio.run(asyncio.wait_for(outcome, 5))
    return outcome


@pytest.mark.parametrize("label, name", list(arguments()))
def test_an_argument_of_the_wrong_type_names_itself(label, name):
    kwargs = {key: value for key, value in NEEDED.get(label, {}).items() if key != name}
    kwargs[name] = Odd()
    with pytest.raises((TypeError, ValueError)) as raised:
        call(label, **kwargs)
    assert str(raised.value).startswith(f"{name} "), str(raised.value)


def test_the_message_says_what_it_takes_and_what_it_got():
    with pytest.raises(TypeError, match=r"^port must be an int, got str '8000'"):
        framesock.Server(port="8000")
    with pytest.raises(TypeError, match=r"^timeout must be a number or None, got str '1'"):
        framesock.Client(timeout="1")
    with pytest.raises(TypeError, match=r"^proxy_from must be a list of str or None, got str '10.0.0.0/8'"):
        framesock.Server(proxy_protocol=True, proxy_from="10.0.0.0/8")
    with pytest.raises(TypeError, match=r"^response cannot be sent as JSON: Object of type set is not JSON serializable"):
        framesock.Server(response={1})
    with pytest.raises(TypeError, match=r"^max_connections must be an int, got str 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\.\.\."):
        framesock.Server(max_connections="x" * 100)  # a long value is cut


def test_methods_name_their_arguments_too():
    with framesock.Server(port=0, protocol="framed") as server:
        client = framesock.Client(server.host, server.port, protocol="framed")
        with pytest.raises(TypeError, match="^idempotent must be a bool or None, got str 'yes'"):
            client.request("hi", idempotent="yes")
        with pytest.raises(TypeError, match="^message cannot be sent as JSON: "):
            client.request(Odd())
        client.close()
        with pytest.raises(TypeError, match="^timeout must be a number or None, got Odd <odd>"):
            server.shutdown(timeout=Odd())

    async def with_aio():
        async with aio.Server(port=0, protocol="framed") as server:
            async with aio.Client(server.host, server.port, protocol="framed") as client:
                with pytest.raises(TypeError, match="^idempotent must be a bool, got str 'yes'"):
                    await client.request("hi", idempotent="yes")
            with pytest.raises(TypeError, match="^timeout must be a number or None"):
                await server.shutdown(timeout="soon")

    asyncio.run(with_aio())


def test_a_bad_argument_is_refused_before_anything_binds():
    # start_server() binds, then calls ready(): a bad `ready` is refused first, the port unused.
    with pytest.raises(TypeError, match="^ready must be callable or None"):
        framesock.start_server(port=0, ready="not callable")


def test_run_refuses_a_keyword_that_is_no_setting():
    with pytest.raises(TypeError, match=r"run\(\) got an unexpected keyword argument 'max_conections'"):
        framesock.run("no_such_module:handler", max_conections=10)
