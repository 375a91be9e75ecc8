"""ThreadsafeFunction's contract beyond Node's own test cases (see test_node_ports.py).

Each test tells one rule of API.md's ThreadsafeFunction section. Two tools make the
threaded ones deterministic:

- `idle_loop`: an event loop that is *not running*. Nothing is delivered until the
  test runs it, so a bounded queue stays full for as long as the test wants, and a
  caller blocked for room stays blocked until the test acts.
- blocking the loop thread on purpose (`worker.join()` inside a coroutine): while the
  loop thread waits there, no drain can run, so every call a worker makes meanwhile
  is known to have happened "while a drain was pending".
"""

from __future__ import annotations

import asyncio
import functools
import gc
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, SupportsIndex

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from _helpers import (
    WAIT,
    Worker,
    blocked_callers,
    loop_errors,
    result_of,
    start,
    wait_until,
)
from _loops import LoopFactory

import tsfn
from tsfn._function import _PLACEHOLDERS, _gil_enabled
from tsfn._results import SubmitFuture
from tsfn._running import running_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

# -- helpers -------------------------------------------------------------------------------


def wake_up_spy(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., object]]:
    """Record every callback scheduled on the running loop from another thread.

    A ThreadsafeFunction wakes its loop through its loop port's
    `call_soon_threadsafe`, looked up when the function is created; so the spy must
    be in place before the function is.
    """
    port = running_port("wake_up_spy")
    scheduled: list[Callable[..., object]] = []
    real = port.call_soon_threadsafe

    def spy(callback: Callable[..., object], *args: Any) -> Any:
        scheduled.append(callback)
        return real(callback, *args)

    monkeypatch.setattr(port, "call_soon_threadsafe", spy)
    return scheduled


def drains_of(fn: tsfn.ThreadsafeFunction[Any], scheduled: list[Callable[..., object]]) -> int:
    return sum(1 for callback in scheduled if getattr(callback, "__self__", None) is fn)


# -- call: blocking, non-blocking, timeout -------------------------------------------------


async def test_callback_runs_later_on_the_loop_thread_never_inside_call() -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[int, int]] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda data: seen.append((data, threading.get_ident()))
    )

    fn.call(1)  # on the loop thread: queued, not run
    future = fn.submit(2)
    assert seen == []
    assert not future.done()
    start(lambda: fn.call(3)).finish()  # from another thread: same
    assert seen == []

    fn.release()
    await fn.wait_closed()
    assert seen == [(1, loop_thread), (2, loop_thread), (3, loop_thread)]


async def test_call_nowait_on_a_full_queue_raises_queue_full_which_is_a_queue_full() -> None:
    got: list[str] = []
    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(got.append, max_queue_size=1)
    fn.call_nowait("first")
    with pytest.raises(queue.Full) as caught:  # code written for queue.Queue catches it
        fn.call_nowait("second")
    assert isinstance(caught.value, tsfn.QueueFull)
    assert isinstance(caught.value, tsfn.TsfnError)
    assert fn.qsize() == 1, "a call that raised must not queue its item"
    fn.release()
    await fn.wait_closed()
    assert got == ["first"]


async def test_blocking_call_on_the_loop_thread_with_a_full_queue_raises_would_deadlock() -> None:
    got: list[str] = []
    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(got.append, max_queue_size=1)
    fn.call("first")  # blocking, but there is room: fine on the loop thread

    for attempt in (
        lambda: fn.call("x"),
        lambda: fn.call("x", timeout=5),
        lambda: fn.submit("x"),
        lambda: fn.submit("x", timeout=5),
    ):
        with pytest.raises(tsfn.WouldDeadlock, match="loop thread"):
            attempt()
    # Calls that would not wait at all say the queue is full, not "deadlock".
    for attempt in (
        lambda: fn.call("x", block=False),
        lambda: fn.call("x", timeout=0),
        lambda: fn.call_nowait("x"),
        lambda: fn.submit("x", block=False),
        lambda: fn.submit("x", timeout=0),
    ):
        with pytest.raises(tsfn.QueueFull):
            attempt()

    assert fn.qsize() == 1
    fn.release()
    await fn.wait_closed()
    assert got == ["first"]


async def test_would_deadlock_is_a_tsfn_error_but_not_queue_full() -> None:
    assert issubclass(tsfn.WouldDeadlock, tsfn.TsfnError)
    assert not issubclass(tsfn.WouldDeadlock, queue.Full)
    assert issubclass(tsfn.Closing, tsfn.TsfnError)
    assert not issubclass(tsfn.Closing, queue.Full)


def test_blocking_call_with_a_timeout_raises_queue_full_when_no_room_comes(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, max_queue_size=1, loop=idle_loop
    )
    fn.call(1)  # the loop is not running: this item stays, the queue stays full
    began = time.monotonic()
    with pytest.raises(tsfn.QueueFull) as caught:
        fn.call(2, timeout=0.05)
    assert time.monotonic() - began >= 0.04  # it did wait (clock granularity aside)
    assert isinstance(caught.value, queue.Full)
    with pytest.raises(tsfn.QueueFull):
        fn.submit(2, timeout=0.01)
    with pytest.raises(tsfn.QueueFull):
        fn.call(2, timeout=0)  # zero: no wait at all
    assert fn.qsize() == 1
    fn.abort()


@pytest.mark.parametrize("method", ["call", "submit"])
@pytest.mark.parametrize("then", ["room", "abort"])
@pytest.mark.parametrize("timeout", [None, 10**400], ids=["no-timeout", "too-large-to-time"])
def test_blocking_call_from_a_thread_waits_until_the_loop_makes_room_or_closes(
    idle_loop: asyncio.AbstractEventLoop, method: str, then: str, timeout: float | None
) -> None:
    """The caller waits for room, or for `Closing`; with no timeout, and with one
    longer than anything the platform can time (issue 9, defect 13: `timeout=10**400`
    passed the argument check, then its deadline, `time.monotonic() + timeout`,
    raised OverflowError, which names no argument)."""
    got: list[object] = []
    second_delivered = asyncio.Event()

    def callback(item: object) -> None:
        got.append(item)
        if item == "second":
            second_delivered.set()

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        callback, max_queue_size=1, loop=idle_loop
    )
    fn.call("first")  # the loop is not running: the queue stays full
    worker = start(lambda: getattr(fn, method)("second", timeout=timeout))
    wait_until(lambda: not worker.is_alive() or blocked_callers(fn) == 1)
    assert worker.error is None, repr(worker.error)  # it waits: no OverflowError
    if then == "room":
        idle_loop.run_until_complete(second_delivered.wait())
        worker.finish()
        assert worker.error is None, repr(worker.error)
        fn.release()
        idle_loop.run_until_complete(fn.wait_closed())
        assert got == ["first", "second"]
    else:
        fn.abort()
        worker.finish()
        assert isinstance(worker.error, tsfn.Closing), repr(worker.error)
        idle_loop.run_until_complete(fn.wait_closed())
        assert got == []


# -- submit --------------------------------------------------------------------------------


async def test_submit_future_gets_the_callback_return_value() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda n: n * 10)
    on_loop = fn.submit(4)
    from_thread = start(lambda: fn.submit(5).result(WAIT))  # blocks its thread, not ours
    assert await result_of(on_loop) == 40
    await anyio.to_thread.run_sync(from_thread.finish)  # its item needs the loop to keep turning
    assert from_thread.result == 50
    fn.release()
    await fn.wait_closed()


async def test_submit_awaits_an_awaitable_result_on_the_loop_before_finalizing() -> None:
    started, gate = anyio.Event(), anyio.Event()
    finalized: list[bool] = []

    async def callback(n: int) -> int:
        started.set()
        await gate.wait()
        return n + 1

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        callback, finalizer=lambda _: finalized.append(True)
    )
    future = fn.submit(1)
    fn.release()
    await started.wait()  # the item is delivered; its coroutine waits on the gate
    assert not future.done()
    assert finalized == [], "the finalizer must wait for the awaitable result"
    gate.set()
    await fn.wait_closed()
    assert future.result() == 2
    assert finalized == [True]


async def test_abort_cancels_the_future_of_a_discarded_item_and_hands_call_js_its_data() -> None:
    discarded: list[tuple[object, object, object, object]] = []

    def call_js(loop: object, callback: object, context: object, data: object) -> None:
        if loop is None:
            discarded.append((loop, callback, context, data))

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        lambda _: None, call_js=call_js, context="ctx"
    )
    future = fn.submit("payload")
    fn.abort()  # same loop turn: the item was never delivered
    await fn.wait_closed()
    assert future.cancelled()
    assert discarded == [(None, None, "ctx", "payload")]


async def test_abort_cancels_the_future_of_an_awaitable_still_running() -> None:
    started = anyio.Event()

    async def callback(_: object) -> None:
        started.set()
        await anyio.sleep_forever()

    fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(callback)
    future = fn.submit(None)
    await started.wait()  # the item is delivered and its coroutine started
    assert not future.done()
    fn.abort()
    await fn.wait_closed()
    assert future.cancelled()


async def test_submit_cancelled_before_delivery_discards_the_item() -> None:
    delivered: list[str] = []
    discarded: list[str] = []

    def call_js(loop: object, callback: Any, context: object, data: str) -> None:
        if loop is None:
            discarded.append(data)
        else:
            callback(data)

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(delivered.append, call_js=call_js)
    unwanted = fn.submit("unwanted")
    assert unwanted.cancel()  # still queued: cancellable
    wanted = fn.submit("wanted")
    await result_of(wanted)
    fn.release()
    await fn.wait_closed()
    assert delivered == ["wanted"]
    assert discarded == ["unwanted"]


async def test_submit_future_cannot_be_cancelled_while_its_callback_runs() -> None:
    """Issue 9, defect 5: `cancel()` on the future of a plain callback that is running
    returned True, and the result the callback then returned was lost. A running
    `concurrent.futures.Future` cannot be cancelled: `cancel()` is False, the future
    says it is running, and it gets the result."""
    running = threading.Event()
    tried = threading.Event()  # the submitter has tried to cancel

    def callback(n: int) -> int:
        running.set()
        # Hold the loop thread inside the callback until the submitter has tried.
        assert tried.wait(WAIT)
        return n * 2

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback)

    def submitter() -> tuple[bool, bool, object]:
        future = fn.submit(21)
        fn.release()  # here, not on the loop: released first, submit would raise Closing
        assert running.wait(WAIT)
        try:
            was_running, cancelled = future.running(), future.cancel()
        finally:
            tried.set()
        return was_running, cancelled, future.result(WAIT)

    worker = start(submitter)
    await fn.wait_closed()
    worker.finish()
    assert worker.error is None, repr(worker.error)
    assert worker.result == (True, False, 42)


async def test_submit_future_cannot_be_cancelled_once_its_callback_has_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sibling of issue 9, defect 5: the callback has returned, its result is not yet in
    the future, and the submitter (say, giving up after a timeout) cancels. The call
    has run: `cancel()` must say False and the future get the result, or the caller
    believes undone what was done. The window is a few bytecodes on the loop thread,
    so a white-box hook on the future's end-of-call mark holds it open."""
    attempts: list[bool] = []
    real_end_call = SubmitFuture.end_call

    def end_call_then_cancel(future: SubmitFuture[Any]) -> None:
        real_end_call(future)
        start(lambda: attempts.append(future.cancel())).finish()

    monkeypatch.setattr(SubmitFuture, "end_call", end_call_then_cancel)
    ran: list[int] = []

    def callback(n: int) -> int:
        ran.append(n)
        return n * 2

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback)
    future = fn.submit(21)
    fn.release()
    await fn.wait_closed()
    assert ran == [21]
    assert attempts == [False]
    assert future.result(0) == 42


@pytest.mark.parametrize("canceller", ["loop thread", "worker thread"])
async def test_cancelling_the_future_of_a_running_async_callback_cancels_its_task(
    canceller: str,
) -> None:
    """Issue 9, defect 6: cancelling the future of a submit() whose async callback runs
    returned True while the coroutine ran on to completion. As with
    `asyncio.run_coroutine_threadsafe`, cancelling the future cancels the task: the
    coroutine sees CancelledError where it awaits, and does not finish. (On trio, a
    cancel from the loop thread once went through the loop's queue, landed after
    `proceed.set()` had woken the task, and came too late: trio cancels only at a
    checkpoint.)"""
    started = anyio.Event()
    proceed = anyio.Event()
    outcome: list[str] = []
    cancelled = anyio.get_cancelled_exc_class()

    async def callback(n: int) -> int:
        started.set()
        try:
            await proceed.wait()
        except cancelled:
            outcome.append("cancelled")
            raise
        outcome.append("ran to completion")
        return n

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback)
    future = fn.submit(1)
    await started.wait()
    if canceller == "loop thread":
        assert future.cancel()
    else:
        assert await anyio.to_thread.run_sync(future.cancel)
    # Had the task not been told, this would let the coroutine run to its end.
    proceed.set()
    fn.release()
    await fn.wait_closed()  # the finalizer waits for the task
    assert outcome == ["cancelled"]
    assert future.cancelled()


# -- producers: acquire, release, abort ----------------------------------------------------


async def test_acquire_returns_a_context_manager_that_releases() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    with fn.acquire():
        assert fn.thread_count == 2
    assert fn.thread_count == 1
    with pytest.raises(KeyError), fn.acquire():  # released on the way out of an error too
        raise KeyError("x")
    assert fn.thread_count == 1
    fn.release()
    await fn.wait_closed()


async def test_acquire_once_closing_raises_closing() -> None:
    released: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    released.release()
    aborted: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    aborted.abort()
    for fn in (released, aborted):
        with pytest.raises(tsfn.Closing):
            fn.acquire()
        await fn.wait_closed()
        with pytest.raises(tsfn.Closing):
            fn.acquire()


async def test_releasing_more_than_acquired_raises_closing() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, initial_thread_count=2
    )
    fn.release()
    fn.release()
    with pytest.raises(tsfn.Closing):
        fn.release()
    assert fn.thread_count == 0
    await fn.wait_closed()
    with pytest.raises(tsfn.Closing):
        fn.release()


async def test_calls_after_the_last_release_raise_closing_and_queued_items_still_arrive() -> None:
    got: list[int] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(got.append)
    fn.call(1)
    fn.call(2)
    fn.release()
    assert fn.closing
    for attempt in (lambda: fn.call(3), lambda: fn.call_nowait(3), lambda: fn.submit(3)):
        with pytest.raises(tsfn.Closing):
            attempt()
    await fn.wait_closed()
    assert got == [1, 2]


async def test_release_after_abort_is_allowed_while_producers_remain() -> None:
    finalized: list[object] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, initial_thread_count=3, finalizer=finalized.append
    )
    fn.abort()
    fn.release()
    fn.release()
    fn.release()
    with pytest.raises(tsfn.Closing):
        fn.release()
    await fn.wait_closed()
    assert finalized == [None]


async def test_abort_is_idempotent() -> None:
    finalized: list[object] = []
    discarded: list[object] = []

    def call_js(loop: object, callback: object, context: object, data: object) -> None:
        if loop is None:
            discarded.append(data)

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        call_js=call_js, finalizer=finalized.append, context="ctx"
    )
    fn.call("queued")
    fn.abort()
    fn.abort()
    await fn.wait_closed()
    fn.abort()
    for _ in range(3):
        await anyio.lowlevel.checkpoint()  # nothing late may follow
    assert finalized == ["ctx"]
    assert discarded == ["queued"]


@pytest.mark.parametrize("close", ["abort", "release"])
def test_closing_wakes_every_caller_blocked_for_room_with_closing(
    idle_loop: asyncio.AbstractEventLoop, close: str
) -> None:
    """abort(), or the last release(), wakes every caller blocked for room: each of
    them raises Closing, and none of their items is queued."""
    delivered: list[int] = []
    discarded: list[int] = []

    def call_js(loop: object, callback: Any, context: object, data: int) -> None:
        (delivered if loop is not None else discarded).append(data)

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        call_js=call_js, max_queue_size=1, loop=idle_loop
    )
    fn.call(0)  # the loop is not running: the queue is full from now on
    callers = [start(functools.partial(fn.call, i), f"blocked-{i}") for i in range(1, 5)]
    wait_until(lambda: blocked_callers(fn) == 4)

    getattr(fn, close)()
    for caller in callers:
        caller.finish()
        assert isinstance(caller.error, tsfn.Closing), caller.error

    idle_loop.run_until_complete(fn.wait_closed())
    # Only the item that was accepted is accounted for, and in the way `close` says.
    assert (delivered, discarded) == (([], [0]) if close == "abort" else ([0], []))


# -- ref / unref ---------------------------------------------------------------------------


async def test_ref_and_unref_only_on_the_loop_thread() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    for method in ("ref", "unref"):
        worker = start(getattr(fn, method))
        worker.finish()
        assert isinstance(worker.error, RuntimeError), worker.error
        assert method in str(worker.error)
    fn.unref()  # on the loop thread: fine
    fn.ref()
    fn.release()
    await fn.wait_closed()


def test_ref_and_unref_are_not_counted(loop_factory: LoopFactory) -> None:
    """unref twice then ref once leaves the function referenced: tsfn.run waits for it."""
    got: list[str] = []
    discarded: list[str] = []
    main_done = threading.Event()

    def call_js(loop: object, callback: Any, context: object, data: str) -> None:
        if loop is None:
            discarded.append(data)
        else:
            got.append(data)

    def late_producer(fn: tsfn.ThreadsafeFunction[str]) -> None:
        main_done.wait(WAIT)
        fn.call("after main returned")
        fn.release()

    async def main() -> tsfn.ThreadsafeFunction[str]:
        fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(call_js=call_js)
        fn.unref()
        fn.unref()
        fn.ref()
        workers.append(start(lambda: late_producer(fn)))
        main_done.set()
        return fn

    workers: list[Worker] = []
    fn = tsfn.run(main(), loop_factory=loop_factory)
    workers[0].finish()
    assert workers[0].error is None
    assert fn.closed
    assert (got, discarded) == (["after main returned"], [])


# -- properties ----------------------------------------------------------------------------


async def test_properties_follow_the_lifecycle() -> None:
    context = object()
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, context=context, name="props", initial_thread_count=2
    )
    assert fn.context is context
    assert fn.name == "props"
    assert "props" in repr(fn)
    assert (fn.thread_count, fn.closing, fn.closed, fn.qsize()) == (2, False, False, 0)

    fn.call(1)
    fn.call(2)
    assert fn.qsize() == 2  # queued, not delivered: the loop has not had a turn
    await result_of(fn.submit(3))
    assert fn.qsize() == 0

    fn.acquire()
    assert fn.thread_count == 3
    fn.release()
    fn.release()
    assert (fn.thread_count, fn.closing, fn.closed) == (1, False, False)
    fn.release()
    assert (fn.thread_count, fn.closing) == (0, True)
    await fn.wait_closed()
    assert fn.closed


async def test_name_defaults_to_none_and_context_to_none() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    assert fn.name is None
    assert fn.context is None
    fn.abort()
    await fn.wait_closed()


# -- wait_closed and async with ------------------------------------------------------------


async def test_wait_closed_returns_after_the_finalizer_for_every_waiter() -> None:
    order: list[str] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, finalizer=lambda _: order.append("finalizer")
    )

    async def waiter(name: str) -> None:
        await fn.wait_closed()
        order.append(name)

    async with anyio.create_task_group() as tasks:
        for i in range(3):
            tasks.start_soon(waiter, f"waiter-{i}")
        await anyio.lowlevel.checkpoint()  # the waiters start waiting
        assert order == []
        fn.release()
    assert order[0] == "finalizer"
    assert sorted(order[1:]) == ["waiter-0", "waiter-1", "waiter-2"]
    await fn.wait_closed()  # already closed: returns at once


def _cancelled_waiters_alive() -> int:
    """How many cancelled asyncio futures (tasks aside) are still alive.

    A waiter abandoned by a cancelled or timed-out `wait_closed()` is such a future;
    counting all of them needs no knowledge of where tsfn would keep one.
    """
    gc.collect()
    return sum(
        1
        for obj in gc.get_objects()
        if isinstance(obj, asyncio.Future) and not isinstance(obj, asyncio.Task) and obj.cancelled()
    )


@pytest.mark.asyncio_only("counts the asyncio futures abandoned waits leave behind")
@pytest.mark.parametrize("how", ["cancelled", "timed out"])
async def test_abandoned_wait_closed_calls_leave_no_waiter_behind(how: str) -> None:
    """Issue 9, defect 14: each wait_closed() that was cancelled or timed out left its
    future in the function until it closed: a leak for a long-lived function that is
    polled with timeouts. Abandoned waits must not pile up; a real wait still works."""
    finalized: list[bool] = []
    fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
        lambda _: None, finalizer=lambda _: finalized.append(True)
    )

    async def abandon_three() -> None:
        if how == "timed out":
            for _ in range(3):
                with pytest.raises(asyncio.TimeoutError):  # the function stays open
                    await asyncio.wait_for(fn.wait_closed(), 0.001)
            return
        tasks = [asyncio.ensure_future(fn.wait_closed()) for _ in range(3)]
        await asyncio.sleep(0)  # each task runs up to its wait
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes

    # The count is process-wide: the last abandoned waits may linger a moment in their
    # exceptions' tracebacks, and other tests' leftovers may go meanwhile. What must
    # not happen is one more left behind per wait (60 more here).
    await abandon_three()
    alive = _cancelled_waiters_alive()
    for _ in range(20):
        await abandon_three()
    assert _cancelled_waiters_alive() <= alive, "abandoned waiters pile up"
    fn.release()
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    assert finalized == [True]


async def test_async_with_waits_for_the_producers_to_finish() -> None:
    got: list[int] = []
    async with tsfn.ThreadsafeFunction(got.append) as fn:

        def produce() -> None:
            for i in range(100):
                fn.call(i)
            fn.release()

        worker = start(produce)
    assert fn.closed
    assert got == list(range(100))
    worker.finish()


async def test_async_with_aborts_first_when_the_body_raises() -> None:
    """Nobody will release the initial producer: without the abort, this would hang."""
    discarded: list[int] = []
    finalized: list[object] = []

    def call_js(loop: object, callback: object, context: object, data: int) -> None:
        if loop is None:
            discarded.append(data)

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        call_js=call_js, finalizer=finalized.append, context="ctx"
    )

    async def failing_body() -> None:
        async with fn:
            fn.call(1)
            raise LookupError("body failed")

    with pytest.raises(LookupError, match="body failed"):
        await failing_body()
    assert fn.closed
    assert finalized == ["ctx"]
    assert discarded == [1]


async def test_async_with_enters_as_the_function_itself() -> None:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    async with fn as entered:
        assert entered is fn
        fn.release()


# -- callbacks, call_js, finalizer ---------------------------------------------------------


async def test_call_js_gets_the_loop_the_callback_the_context_and_the_data() -> None:
    loop = running_port("the test").token  # the asyncio loop, or trio's token
    calls: list[tuple[object, object, object, object]] = []

    def callback(_: object) -> None:
        pass

    def call_js(*args: object) -> None:
        calls.append(args)  # type: ignore[arg-type]

    with_callback: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        callback, call_js=call_js, context="ctx"
    )
    without_callback: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        call_js=call_js, context="ctx"
    )
    with_callback.call("a")
    without_callback.call("b")
    for fn in (with_callback, without_callback):
        fn.release()
        await fn.wait_closed()
    assert calls == [(loop, callback, "ctx", "a"), (loop, None, "ctx", "b")]


async def test_abort_inside_a_callback_stops_delivery_at_once() -> None:
    """Items queued behind the one being delivered are not delivered after abort(), even
    those the running drain had already picked up: they go to call_js as discards."""
    delivered: list[int] = []
    discarded: list[int] = []

    def call_js(loop: object, callback: object, context: object, data: int) -> None:
        if loop is None:
            discarded.append(data)
            return
        delivered.append(data)
        if data == 1:
            fn.abort()

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(call_js=call_js)
    for i in range(5):
        fn.call(i)  # one turn: all five wait for the same drain
    await fn.wait_closed()
    assert (delivered, discarded) == ([0, 1], [2, 3, 4])


async def test_an_async_call_js_is_awaited_for_discarded_items_before_the_finalizer() -> None:
    """Issue 9, defect 16: an `async def call_js` was awaited for delivered items but not
    for discarded ones: those coroutines were dropped ("coroutine ... was never
    awaited", a RuntimeWarning that pytest turns into an error here) and their cleanup
    never ran. Each discard's coroutine runs to its end, and all before the finalizer.
    The coroutines run as tasks, in the order the loop picks (trio's is random)."""
    order: list[object] = []

    async def call_js(loop: object, callback: object, context: object, data: int) -> None:
        try:
            await anyio.lowlevel.checkpoint()  # a real await: the cleanup below is not synchronous
        finally:
            order.append(("delivered" if loop is not None else "discarded", data))

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        call_js=call_js, finalizer=lambda _: order.append("finalized")
    )
    for i in range(3):
        fn.call(i)  # the loop thread is here: all three are still queued ...
    fn.abort()  # ... and discarded
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    *discards, last = order
    assert sorted(discards, key=repr) == [("discarded", 0), ("discarded", 1), ("discarded", 2)]
    assert last == "finalized"


async def test_an_async_finalizer_is_awaited_or_refused_never_dropped() -> None:
    """Sibling of issue 9, defect 16: a finalizer written as `async def` returns a
    coroutine. Dropping it ("coroutine ... was never awaited") skips its cleanup in
    silence. Either way is honest: refuse it when the function is made (TypeError
    naming `finalizer`), or await it before wait_closed() returns."""
    ran: list[bool] = []

    async def finalizer(_: object) -> None:
        await anyio.lowlevel.checkpoint()
        ran.append(True)

    try:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            lambda _: None,
            finalizer=finalizer,  # the mistake under test
        )
    except TypeError as exc:
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "finalizer" in refused
        return
    fn.release()
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    gc.collect()  # a dropped coroutine warns here, inside the test
    assert ran == [True]


@pytest.mark.parametrize("max_queue_size", [0, 1], ids=["unbounded", "bounded"])
async def test_no_wake_up_is_lost_when_each_call_waits_for_its_delivery(
    max_queue_size: int, tiny_switch_interval: None
) -> None:
    """Ping-pong: every call lands just as the drain before it goes idle, the moment a
    lost wake-up would strand the item (and this test would time out)."""
    rounds = 2000
    delivered = threading.Semaphore(0)
    got: list[int] = []

    def callback(item: int) -> None:
        got.append(item)
        delivered.release()

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        callback, max_queue_size=max_queue_size
    )

    def ping() -> None:
        for i in range(rounds):
            fn.call(i)
            if not delivered.acquire(timeout=WAIT):
                raise AssertionError(f"item {i} was never delivered")
        fn.release()

    worker = start(ping)
    await fn.wait_closed()
    worker.finish()
    assert worker.error is None
    assert got == list(range(rounds))


async def test_finalizer_runs_once_on_the_loop_thread_after_every_item(
    tiny_switch_interval: None,
) -> None:
    """Eight racing producers, each releasing when done; items from each stay in order."""
    producers, per_producer = 8, 250
    got: list[tuple[int, int]] = []
    finalized: list[tuple[int, int]] = []
    fn: tsfn.ThreadsafeFunction[tuple[int, int]] = tsfn.ThreadsafeFunction(
        got.append,
        max_queue_size=16,
        initial_thread_count=producers,
        finalizer=lambda _: finalized.append((threading.get_ident(), len(got))),
    )

    def produce(p: int) -> None:
        for i in range(per_producer):
            fn.call((p, i))
        fn.release()

    workers = [start(functools.partial(produce, p)) for p in range(producers)]
    await fn.wait_closed()
    for worker in workers:
        worker.finish()
        assert worker.error is None
    assert finalized == [(threading.get_ident(), producers * per_producer)]
    for p in range(producers):
        assert [i for q, i in got if q == p] == list(range(per_producer))


# -- wake-ups ------------------------------------------------------------------------------


async def test_calls_while_a_drain_is_pending_cost_one_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduled = wake_up_spy(monkeypatch)
    got: list[int] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(got.append)

    # From the loop thread, in one turn: the first call wakes the loop, the rest ride along.
    for i in range(100):
        fn.call(i)
    await result_of(fn.submit(100))
    assert drains_of(fn, scheduled) == 1

    # From a thread while the loop thread is held: a drain is pending the whole time.
    def produce() -> None:
        for i in range(101, 1101):
            fn.call(i)

    start(produce).finish()  # blocks the loop thread on purpose: nothing drains meanwhile
    assert drains_of(fn, scheduled) == 2
    await result_of(fn.submit(1101))
    assert drains_of(fn, scheduled) == 2
    fn.release()
    await fn.wait_closed()
    assert got == list(range(1102))


async def test_calls_while_a_drain_runs_wake_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Items queued while a callback runs are picked up by that drain's follow-up."""
    scheduled = wake_up_spy(monkeypatch)
    got: list[int] = []
    all_delivered = anyio.Event()

    def flood() -> None:
        for i in range(1, 501):
            fn.call(i)

    def callback(item: int) -> None:
        got.append(item)
        if item == 0:
            start(flood).finish()  # inside a drain, the loop thread waits for the flood
        elif item == 500:
            all_delivered.set()

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback)
    fn.call(0)
    await all_delivered.wait()
    assert drains_of(fn, scheduled) == 1
    fn.release()
    await fn.wait_closed()
    assert got == list(range(501))


async def test_a_drain_delivers_at_most_1000_items_then_lets_other_callbacks_run() -> None:
    got: list[object] = []
    port = running_port("the test")

    def callback(item: int) -> None:
        got.append(item)
        if item == 0:
            port.call_soon(functools.partial(got.append, "other callback"))

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback)

    def produce() -> None:
        for i in range(2500):
            fn.call(i)

    start(produce).finish()  # the loop thread is held: all 2500 wait for one drain
    fn.release()
    await fn.wait_closed()
    position = got.index("other callback")
    assert 1 <= position <= 1000, f"the loop ran other callbacks only after {position} items"
    assert [item for item in got if item != "other callback"] == list(range(2500))


# -- the two lock-free hand-offs (white-box) ------------------------------------------------
#
# _function.py's docstring names two hand-offs that keep the unlocked call path correct:
# the wake token (no lost wake-up) and the in-flight marker (no item lands after the
# last look at closing). Each is a window of a few bytecodes that random scheduling
# rarely hits, so these tests hook the function's internals to stop a producer exactly
# inside the window. Each asserts that its hook fired, so a refactoring that makes the
# hook miss fails loudly instead of passing quietly.


class _ProducerHook:
    """Once `producer` is set, the next time the loop thread passes the hook, `producer`
    runs on another thread, to its end, before the loop's next step."""

    def __init__(self, loop_thread: int) -> None:
        self.loop_thread = loop_thread
        self.producer: Callable[[], object] | None = None
        self.fired = False

    def passed(self) -> None:
        if self.producer is not None and threading.get_ident() == self.loop_thread:
            producer, self.producer = self.producer, None
            start(producer).finish()
            self.fired = True


class _QueueWithAHook(deque[Any]):
    """The function's queue: the hook runs right after the loop finds it empty."""

    def __init__(self, hook: _ProducerHook) -> None:
        super().__init__()
        self.hook = hook

    def __bool__(self) -> bool:
        empty = len(self) == 0
        if empty:
            self.hook.passed()
        return not empty  # the look taken before the producer's append


@pytest.mark.parametrize("max_queue_size", [0, 10], ids=["unbounded", "bounded"])
async def test_an_item_queued_as_the_drain_goes_idle_is_still_delivered(
    max_queue_size: int,
) -> None:
    """The drain saw an empty queue; a producer appends and, with the wake token still
    held by that drain, schedules nothing. The drain must look again after putting the
    token back, or the item waits forever."""
    late_delivered = anyio.Event()

    def callback(item: str) -> None:
        if item == "first":
            hook.producer = lambda: fn.call("late")
        else:
            late_delivered.set()

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        callback, max_queue_size=max_queue_size
    )
    hook = _ProducerHook(threading.get_ident())
    hooked = _QueueWithAHook(hook)
    fn._queue = hooked
    fn._life._occupied = hooked.__len__
    fn.call("first")
    with anyio.fail_after(WAIT):
        await late_delivered.wait()
    assert hook.fired
    fn.release()
    await fn.wait_closed()


class _TokenWithAPutBackHook(list[None]):
    """The function's wake token: the hook runs right after the loop puts it back."""

    def __init__(self, hook: _ProducerHook) -> None:
        super().__init__([None])
        self.hook = hook

    def append(self, item: None) -> None:
        super().append(item)
        self.hook.passed()


async def test_a_producer_taking_the_token_the_drain_just_put_back_schedules_the_drain() -> None:
    """Commit 1eb987c: the drain found the queue empty and put the wake token back; a
    lock-free producer appended and took the token before the drain looked at the queue
    again. The drain then sees the item but no token: the producer schedules the next
    drain, so this one must not take the token again (an IndexError from the drain, once
    on 3.10 in CI). The late item is delivered, and nothing reaches the loop's handler."""
    late_delivered = anyio.Event()

    def callback(item: str) -> None:
        if item == "first":
            hook.producer = lambda: fn.call("late")  # it finds the token, and takes it
        else:
            late_delivered.set()

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(callback)
    if not fn._lock_free:
        pytest.skip("no GIL: the hooked call would take the lock the drain holds here")
    hook = _ProducerHook(threading.get_ident())
    fn._wake_token = _TokenWithAPutBackHook(hook)
    with loop_errors() as errors, anyio.fail_after(WAIT):
        fn.call("first")
        await late_delivered.wait()
        assert hook.fired, "the hook never ran: rewrite this test"
        fn.release()
        await fn.wait_closed()
    assert errors == []


# White-box tests of the unlocked path, which a free-threaded build with the GIL off never
# takes (every call takes the lock there; see tsfn/_function.py).
_lock_free_path_only = pytest.mark.skipif(
    not _gil_enabled(), reason="the unlocked path is taken only with the GIL"
)


class _InflightWithAHook(list[None]):
    """The function's in-flight markers; tells when the loop first looks at them."""

    def __init__(self, loop_thread: int, looked: threading.Event) -> None:
        super().__init__([None] * _PLACEHOLDERS)
        self.loop_thread = loop_thread
        self.looked = looked

    def __len__(self) -> int:
        if threading.get_ident() == self.loop_thread:
            self.looked.set()
        return super().__len__()


@_lock_free_path_only
async def test_a_call_that_passed_the_closing_check_lands_before_abort_discards() -> None:
    """An unbounded call checked `closing` (not yet set) and is about to append when the
    loop aborts. abort must wait for it, so the item is discarded like the others:
    a call that returns normally is always delivered or discarded."""
    loop_thread = threading.get_ident()
    discarded: list[str] = []
    go = threading.Event()  # the loop is looking at the in-flight calls (or finished)
    checked = threading.Event()

    def call_js(loop: object, callback: object, context: object, data: str) -> None:
        if loop is None:
            discarded.append(data)

    fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
        call_js=call_js, finalizer=lambda _: go.set()
    )
    fn._inflight = _InflightWithAHook(loop_thread, go)
    real_is_closed = fn._loop_closed

    def is_closed_then_stall() -> bool:
        closed = real_is_closed()
        if threading.get_ident() != loop_thread:
            checked.set()  # past the closing check, before the append
            go.wait(WAIT)
        return closed

    fn._loop_closed = is_closed_then_stall
    producer = start(lambda: fn.call("in flight"))
    assert checked.wait(WAIT)
    fn.abort()
    await fn.wait_closed()
    producer.finish()
    assert producer.error is None  # it returned normally ...
    assert discarded == ["in flight"]  # ... so its item must be accounted for


class _TokenWithAHook(list[None]):
    """The function's wake token; stalls one producer at its first look at the token,
    that is after its item is queued and before it sends the wake-up."""

    def __init__(self, producer: str, appended: threading.Event, resume: threading.Event) -> None:
        super().__init__([None])
        self.producer: str | None = producer  # the thread's name
        self.appended = appended
        self.resume = resume

    def __bool__(self) -> bool:
        if threading.current_thread().name == self.producer:
            self.producer = None
            self.appended.set()
            self.resume.wait(WAIT)
        return len(self) > 0


def test_a_call_racing_loop_shutdown_raises_closing_only_if_its_item_was_not_taken(
    run_on_new_loop: Callable[[Callable[[], Awaitable[None]]], None],
) -> None:
    """The item is queued; before its caller sends the wake-up, the loop's end aborts the
    function (handing the item to call_js as a discard) and closes the loop. The call
    must then return normally: raising Closing tells the caller its item was not
    queued, and a caller that frees the item on Closing would free it twice."""
    discarded: list[str] = []
    appended, loop_gone = threading.Event(), threading.Event()
    token = _TokenWithAHook("racing-producer", appended, loop_gone)
    workers: list[Worker] = []

    def call_js(loop: object, callback: object, context: object, data: str) -> None:
        if loop is None:
            discarded.append(data)

    async def main() -> None:
        fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(call_js=call_js)
        fn._wake_token = token
        workers.append(start(lambda: fn.call("racing"), "racing-producer"))
        appended.wait(WAIT)  # holds the loop thread: the wake-up is not sent yet

    try:
        run_on_new_loop(main)
    finally:
        loop_gone.set()
    workers[0].finish()
    if not appended.is_set():
        pytest.fail("the hook never stopped the producer: rewrite this test")
    assert discarded == ["racing"]
    assert workers[0].error is None


# An interrupt (Ctrl+C's KeyboardInterrupt, or an exception sent to the thread with
# PyThreadState_SetAsyncExc) lands between two bytecodes of a producer. Where exactly
# cannot be chosen from outside, so the hooks below raise KeyboardInterrupt from inside
# the operation that opens each window, right after that operation took effect: the
# same state as an interrupt landing just after it.


class _TokenTakenThenInterrupted(list[None]):
    """The function's wake token: `producer`'s first pop takes it, then raises."""

    def __init__(self, producer: str) -> None:
        super().__init__([None])
        self.producer: str | None = producer  # the thread's name

    def pop(self, index: SupportsIndex = -1) -> None:
        taken = super().pop(index)
        if threading.current_thread().name == self.producer:
            self.producer = None
            raise KeyboardInterrupt
        return taken


@pytest.mark.parametrize("max_queue_size", [0, 4], ids=["unbounded", "bounded"])
async def test_an_interrupt_after_taking_the_wake_token_does_not_wedge_the_function(
    max_queue_size: int,
) -> None:
    """Issue 9, defect 3: a producer interrupted after it took the wake token and before
    it scheduled the drain lost the token for good: no later call woke the loop, and
    release() never finalized. Later calls must be delivered and release() finalize."""
    delivered: list[object] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        delivered.append,
        max_queue_size=max_queue_size,
        finalizer=lambda _: delivered.append("finalized"),
    )
    token = _TokenTakenThenInterrupted("interrupted-producer")
    fn._wake_token = token
    interrupted = start(lambda: fn.call(1), "interrupted-producer")
    interrupted.finish()
    assert token.producer is None, "the hook never fired: rewrite this test"
    assert isinstance(interrupted.error, KeyboardInterrupt)  # the interrupt reaches its thread

    def later_producer() -> None:
        fn.call(2)
        fn.release()

    later = start(later_producer)
    await anyio.to_thread.run_sync(later.finish)
    assert later.error is None, repr(later.error)
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    # Item 1 was queued before the interrupt: it is delivered like any other.
    assert delivered == [1, 2, "finalized"]


class _MarkedThenInterrupted(list[None]):
    """The function's in-flight markers: `producer`'s first mark is added, then raises."""

    def __init__(self, producer: str) -> None:
        super().__init__([None] * _PLACEHOLDERS)
        self.producer: str | None = producer  # the thread's name

    def append(self, marker: None) -> None:
        super().append(marker)
        if threading.current_thread().name == self.producer:
            self.producer = None
            raise KeyboardInterrupt


@_lock_free_path_only
async def test_an_interrupt_after_marking_a_call_in_flight_leaves_no_marker() -> None:
    """Issue 9, defect 3 (its 3.10 half): an interrupt between marking an unbounded call
    in flight and entering the `try` that unmarks it left the marker behind, and the
    loop then spun forever waiting for that call before it could finalize. The marker
    must go with the interrupted call; later calls and the finalizer go on."""
    delivered: list[object] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        delivered.append, finalizer=lambda _: delivered.append("finalized")
    )
    markers = _MarkedThenInterrupted("interrupted-producer")
    fn._inflight = markers
    interrupted = start(lambda: fn.call(1), "interrupted-producer")
    interrupted.finish()
    assert markers.producer is None, "the hook never fired: rewrite this test"
    assert isinstance(interrupted.error, KeyboardInterrupt)
    # Checked before closing: with a marker left, the finalizing loop would spin for good.
    assert len(markers) == _PLACEHOLDERS, "the interrupted call left its in-flight marker behind"
    fn.call(2)
    fn.release()
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    assert delivered == [2, "finalized"]  # item 1 was interrupted before it was queued


@pytest.mark.parametrize("closer", ["release", "abort"])
async def test_an_interrupt_as_release_or_abort_wakes_the_loop_does_not_wedge_closing(
    closer: str,
) -> None:
    """Sibling of issue 9, defect 3: a producer interrupted in `release()` (its last) or
    `abort()` after the state changed to closing, before the wake-up was sent. No other
    wake-up will come (calls now raise Closing), so the function must not depend on
    that one: the finalizer runs and wait_closed() returns.

    CPython raises a pending KeyboardInterrupt (Ctrl+C in a main thread that produces)
    or an async exception when a function starts to run; the hook raises it where
    `_wake` starts, before its first line."""
    finalized: list[bool] = []
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, finalizer=lambda _: finalized.append(True)
    )
    real_wake = fn._wake
    interrupted: list[bool] = []

    def wake() -> bool:
        if threading.current_thread().name == "interrupted-producer" and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_wake()

    fn._wake = wake  # type: ignore[method-assign]
    producer = start(getattr(fn, closer), "interrupted-producer")
    producer.finish()
    assert interrupted, "the hook never fired: rewrite this test"
    assert isinstance(producer.error, KeyboardInterrupt)
    assert fn.closing
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    assert finalized == [True]
