"""Coroutine handlers run as real asyncio Tasks whose first step is taken at once (eagerly on
Python 3.12+; before that framesock catches the step on asyncio's own loop): on every kind of
loop a handler sees its Task, its own context, working timeouts and cancellation, and a
KeyboardInterrupt or SystemExit from a handler leaves the loop as from any Task."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap

import pytest

from framesock import aio

LOOPS = ["default", "debug", "call_soon shadowed", "uvloop"]


def run_on(kind: str, main) -> None:
    """Runs ``main()`` on the kind of loop named."""
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(main())
    return asyncio.run(main(), debug=kind == "debug")


@pytest.mark.parametrize("kind", LOOPS)
def test_handlers_are_real_tasks_on_every_loop(kind):
    seen = contextvars.ContextVar("seen", default=None)
    tasks = []
    shadowed = []

    async def handler(request):
        task = asyncio.current_task()
        assert task is not None and task in asyncio.all_tasks()
        assert task.get_name() == "framesock-handler"
        tasks.append(task)
        leaked = seen.get()
        seen.set(request)
        if request == "timeout" and sys.version_info >= (3, 11):
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.sleep(30)
            except TimeoutError:
                return {"timed out": True, "cancelling": task.cancelling()}
        if request == "wait":
            await asyncio.sleep(0)
            assert asyncio.current_task() is task
        return {"leaked": leaked}

    async def main():
        loop = asyncio.get_running_loop()
        if kind == "call_soon shadowed":
            real = loop.call_soon

            def counting(*args, **kwargs):
                shadowed.append(args[0])
                return real(*args, **kwargs)

            loop.call_soon = counting
        async with aio.Server(handler, port=0, protocol="framed") as server:
            async with aio.Client(*server.address, protocol="framed") as client:
                assert await client.request("one") == {"leaked": None}
                assert await client.request("wait") == {"leaked": None}
                replies = await asyncio.gather(*(client.request(str(i)) for i in range(50)))
                assert replies == [{"leaked": None}] * 50
                if sys.version_info >= (3, 11):
                    assert await client.request("timeout") == {"timed out": True, "cancelling": 0}
        assert seen.get() is None
        assert all(task.done() for task in tasks)
        if kind == "call_soon shadowed":
            # Left in place, and still asked (by asyncio, for the Tasks that waited).
            assert loop.call_soon is counting and shadowed

    run_on(kind, main)
    assert len(tasks) == 52 + (sys.version_info >= (3, 11))
    assert len(set(map(id, tasks))) == len(tasks)  # one Task each


@pytest.mark.parametrize("kind", LOOPS)
def test_cancelled_handlers_end_cancelled_on_every_loop(kind):
    started = []

    async def handler(request):
        started.append(asyncio.current_task())
        await asyncio.sleep(30)

    async def main():
        server = aio.Server(handler, port=0, protocol="framed")
        await server.start()
        async with aio.Client(*server.address, protocol="framed", timeout=30) as client:
            waiting = asyncio.ensure_future(client.request("x"))
            for _ in range(1000):
                if started:
                    break
                await asyncio.sleep(0.01)
            await server.shutdown(timeout=0.1)
            with pytest.raises(Exception):
                await waiting
        assert started and started[0].cancelled()

    run_on(kind, main)


PROGRAM = """
import asyncio, sys
from framesock import aio

async def handler(request):
    raise {error}("from the handler")

async def main():
    async with aio.Server(handler, port=0, protocol="framed") as server:
        async with aio.Client(*server.address, protocol="framed", timeout=10) as client:
            try:
                await client.request("x")
            except Exception as err:
                print("reply:", type(err).__name__, flush=True)
            await asyncio.sleep(10)
    print("the loop went on", flush=True)

try:
    {run}
except {error}:
    print("{error} left the loop", flush=True)
"""


@pytest.mark.parametrize("error", ["KeyboardInterrupt", "SystemExit"])
@pytest.mark.parametrize("run", ["asyncio.run(main())", "__import__('uvloop').run(main())"])
def test_keyboard_interrupt_or_system_exit_from_a_handler_leaves_the_loop(error, run):
    if "uvloop" in run:
        pytest.importorskip("uvloop")
    program = textwrap.dedent(PROGRAM).format(error=error, run=run)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert f"{error} left the loop" in done.stdout, (done.stdout, done.stderr)
    assert "the loop went on" not in done.stdout
