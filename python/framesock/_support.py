"""Python code the engine runs: the loop of a handler thread, log records, the watch on an
event loop's end, and the signal wake-up of a loop.

These are plain Python on purpose. A handler thread spends its life in the loop below, so while a
handler runs no Rust code is on that thread's stack: if the interpreter exits meanwhile and
ends the thread (CPython does so to a thread that wants the GIL back during finalization), it
ends the way any Python thread does.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import traceback
from typing import Any, AsyncGenerator, Callable

logger = logging.getLogger("framesock")


async def answer(handler: Callable[..., Any], arguments: tuple[Any, ...], send: Callable[[Any, Any], None]) -> None:
    """A coroutine handler's exchange, as the body of its Task: calls the handler, awaits it,
    and hands the outcome to framesock from inside the Task (``send(value, None)`` or
    ``send(None, error)``), with no done-callback and no extra turn of the loop. The Task is
    real: ``current_task()``, ``asyncio.timeout()``, contextvars and cancellation work as in
    any Task. A cancellation is told, then goes on (the Task ends cancelled); an exception is
    told and goes no further (nobody retrieves a handler Task's exception)."""
    try:
        value = await handler(*arguments)
    except Exception as err:  # noqa: BLE001 - it becomes the error reply (and the log's record)
        send(None, err)
        return
    except BaseException as err:  # CancelledError, and KeyboardInterrupt/SystemExit: told, then on
        send(None, err)
        raise
    send(value, None)


def raise_again(error: BaseException) -> None:
    """Raises ``error`` from a loop callback: a ``SystemExit`` or ``KeyboardInterrupt`` out of a
    handler Task's first step, taken at once, leaves the loop as it would have from the step's
    own callback."""
    raise error


def start_handler_thread(source: Any) -> None:
    """Starts a handler thread that runs the jobs of ``source``."""
    thread = threading.Thread(target=run_handler_jobs, args=(source,), name=source.thread_name, daemon=True)
    try:
        thread.start()
    except BaseException:
        source.not_started()
        raise


def run_handler_jobs(source: Any) -> None:
    """Runs the calls ``source`` hands out until its pool closes (``next_job()`` gives None)."""
    batch_scheduling()
    try:
        run_jobs(source)
    except BaseException as err:
        # Not a handler's exception (the pool reports those) but the loop's own, out of memory
        # say: this thread ends, the call in hand fails with it, and a new thread takes the
        # place, so that queued work is never left with no thread to run it.
        traceback.print_exc()
        successor = source.abandon(err)
        if successor is not None:
            start_handler_thread(successor)


def batch_scheduling() -> None:
    """Puts the calling thread under Linux's ``SCHED_BATCH``: same share of the CPU, but waking up
    it waits for the running thread's turn to end instead of cutting it short.

    A handler thread is woken for every few requests; when it cut in, the I/O thread it displaced
    ran out of work sooner and slept too, and on a busy machine each of those switches costs
    microseconds. Measured with the Python-handler benchmark (32 connections), interleaved
    rounds: 5 % more requests per second, 7 % less server CPU per request, p99 latency no worse;
    a lone client sending one request at a time waits about 4 µs longer per round trip.
    """
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # not allowed here (a sandbox, say): the default policy serves too
            pass


def run_jobs(source: Any) -> None:
    """The loop of `run_handler_jobs`: call, hand the outcome over, take the next call."""
    job = source.next_job()
    while job is not None:
        function, arguments, reserve = job
        job = None
        if reserve is not None:
            # Started here rather than in Rust: starting a thread waits for it.
            try:
                start_handler_thread(reserve)
            except Exception:  # noqa: BLE001 - no new thread; the pool goes on with those it has
                traceback.print_exc()
        if function is not None:
            try:
                result = function(*arguments)
            except BaseException as err:  # noqa: BLE001 - the pool reports it (error reply, log)
                source.fail(err)
            else:
                # The reply, and the next call if one is waiting already.
                job = source.done_and_take(result)
                result = None
        if job is None:
            # Drop the references before waiting rather than when the next job comes, which
            # may be never.
            function = arguments = reserve = None
            job = source.next_job()


def takes_caller(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` takes a second positional argument (the ``framesock.Caller``)."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): one argument
        return False
    positional = [
        p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def log(record: tuple[int, str, BaseException | None]) -> None:
    """One record ``(level, message, exception)`` on the ``framesock`` logger, with the
    exception's traceback if there is one."""
    level, message, exc = record
    logger.log(level, message, exc_info=exc)


async def _until_aclosed(on_end: Callable[[], None]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        on_end()


def watch_loop(on_end: Callable[[], None]) -> AsyncGenerator[None, None]:
    """Calls ``on_end()`` when the running event loop is torn down.

    ``asyncio.run()`` (and every ``asyncio.Runner``) ends by closing the async generators it
    saw start (``loop.shutdown_asyncgens()``), while the loop still runs. So this starts one on
    the running loop and returns it; the caller keeps it alive. Unlike a watching Task, it never
    shows in ``asyncio.all_tasks()``.
    """
    agen = _until_aclosed(on_end)
    step = agen.__anext__()  # the loop's first-iteration hook registers the generator here
    try:
        step.send(None)
    except StopIteration:
        pass
    return agen


def wake_loop_on_signals(event_loop: Any, fd: int) -> bool:
    """Has every signal write a byte to ``fd`` (which ``event_loop`` watches), so that a signal
    wakes the loop wherever it lands; returns whether it did.

    Without it a Ctrl-C can wait for the loop's next event (the next timer, perhaps hours away):
    on asyncio's own loop, a signal whose handler runs while the loop thread is about to block
    in ``epoll_wait``, or runs on another thread, does not interrupt the wait. Only on asyncio's
    selector loop, in the main thread, and only when no wake-up fd is set already (asyncio's
    ``add_signal_handler`` sets its own; uvloop always does)."""
    import asyncio.selector_events

    if threading.current_thread() is not threading.main_thread():
        return False
    if not isinstance(event_loop, asyncio.selector_events.BaseSelectorEventLoop):
        return False
    try:
        previous = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        return False
    if previous != -1:
        signal.set_wakeup_fd(previous)  # someone else's: theirs stays
        return False
    return True


def stop_waking_loop_on_signals(fd: int) -> None:
    """Undoes `wake_loop_on_signals`, unless someone has set a wake-up fd of their own since."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        current = signal.set_wakeup_fd(-1)
    except ValueError:
        return
    if current != fd:
        signal.set_wakeup_fd(current)
