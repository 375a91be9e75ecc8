"""AsyncWork: Node-API's napi_async_work (create / queue / cancel), on every loop.

Node's own cases are ported where they apply: AW2 (a work completes with its result),
AW3 and addon-api W1 (a work queued behind a full pool is cancelled: complete gets
`napi_cancelled`, execute never runs), W2 (cancelling a work that has started fails).
A full pool is made on purpose: every test that needs a work to stay queued gives it
an executor with one worker and parks that worker on a `threading.Event` (or, for
trio's default path, takes every token of trio's default `CapacityLimiter`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import trio
from _helpers import WAIT, asyncio_loop, result_of, set_from_worker
from _loops import LoopFactory

import tsfn
from tsfn import AsyncWork, Status

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

Completion = tuple[Status, object, int]  # (status, data, thread ident) seen by complete


class RecordingComplete:
    """A `complete` callback that records what it got and lets the test await it."""

    def __init__(self) -> None:
        self.calls: list[Completion] = []
        self.done = anyio.Event()

    def __call__(self, status: Status, data: object) -> None:
        self.calls.append((status, data, threading.get_ident()))
        self.done.set()


class ParkedPool:
    """An executor whose only worker is kept busy until `unpark()`, so work stays queued.

    With kind "default" the work is created without an executor (the path that goes
    through `run_in_executor`, or trio's threads) and the default is parked too; with
    "explicit" the pool is passed in (the path that owns the executor's future).
    """

    def __init__(self, kind: str) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"parked-{kind}"
        )
        self._unpark_default: Callable[[], None] = lambda: None
        if kind == "default":
            self._unpark_default = park_the_default(self.pool)
        self.for_work: concurrent.futures.Executor | None = None if kind == "default" else self.pool
        self._gate = threading.Event()
        self._parked = threading.Event()
        self.pool.submit(self._park)
        # The worker is taken once the blocker runs; only then is later work "queued".
        assert self._parked.wait(timeout=5)

    def _park(self) -> None:
        self._parked.set()
        self._gate.wait()

    def unpark(self) -> None:
        self._gate.set()
        unpark_default, self._unpark_default = self._unpark_default, lambda: None
        unpark_default()  # once: close() unparks again

    def close(self) -> None:
        self.unpark()
        self.pool.shutdown(wait=True)


@contextlib.contextmanager
def parked_pool(kind: str) -> Iterator[ParkedPool]:
    parked = ParkedPool(kind)
    try:
        yield parked
    finally:
        parked.close()


def park_the_default(pool: concurrent.futures.ThreadPoolExecutor) -> Callable[[], None]:
    """Park the workers of works created without an executor; return what unparks them.

    On asyncio `pool`, its one worker parked, becomes the loop's default executor.
    trio has no default executor: such works run on trio's threads, each holding a
    token of trio's default `CapacityLimiter`, so there every token is taken instead.
    """
    if asyncio_loop() is not None:
        use_as_default(pool)
        return lambda: None
    limiter = trio.to_thread.current_default_thread_limiter()
    total, borrower = limiter.total_tokens, object()
    limiter.acquire_on_behalf_of_nowait(borrower)
    limiter.total_tokens = 1

    def give_back() -> None:
        limiter.release_on_behalf_of(borrower)
        limiter.total_tokens = total

    return give_back


def use_as_default(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Make `pool` the loop's default executor; on trio, which has none, works created
    without an executor run on trio's threads (a free one for each, here) instead."""
    loop = asyncio_loop()
    if loop is not None:
        loop.set_default_executor(pool)


executor_kinds = pytest.mark.parametrize("kind", ["default", "explicit"])


# -- the basic contract --------------------------------------------------------------


async def test_AW2_execute_on_a_worker_complete_on_the_loop_thread() -> None:
    loop_thread = threading.get_ident()
    execute_threads: list[int] = []
    data = {"input": 5}

    def execute(d: dict[str, int]) -> int:
        execute_threads.append(threading.get_ident())
        return d["input"] * 2

    complete = RecordingComplete()
    work = AsyncWork(execute, complete, data=data, name="double")
    assert work.queue() is work
    assert await work == 10
    assert execute_threads != [loop_thread]
    assert len(execute_threads) == 1
    # complete ran before the awaiter woke, on the loop thread, with the same data object.
    assert complete.calls == [(Status.OK, data, loop_thread)]
    assert complete.calls[0][1] is data
    assert work.status is Status.OK


async def test_awaiting_a_work_that_was_never_queued_queues_it() -> None:
    work = AsyncWork(lambda d: d + 1, data=41)
    assert await work == 42
    # It was queued by the await, so queueing it again is the usual error.
    with pytest.raises(RuntimeError, match="already queued"):
        work.queue()


async def test_queue_twice_raises_runtime_error() -> None:
    work = AsyncWork(lambda d: d, data="x")
    work.queue()
    with pytest.raises(RuntimeError):
        work.queue()
    assert await work == "x"


async def test_execute_exception_is_raised_by_await_and_complete_gets_error() -> None:
    boom = ValueError("execute failed")

    def execute(_: object) -> None:
        raise boom

    complete = RecordingComplete()
    work = AsyncWork(execute, complete, data="d")
    with pytest.raises(ValueError, match="execute failed") as caught:
        await work
    assert caught.value is boom
    assert [(s, d) for s, d, _ in complete.calls] == [(Status.ERROR, "d")]
    assert work.status is Status.ERROR


def _raise_stop_iteration(_: object) -> None:
    # Module level, so a process pool can pickle it by reference.
    raise StopIteration("from execute")


@pytest.mark.parametrize("kind", ["default", "explicit"])
def test_execute_raising_stop_iteration_reaches_the_awaiter_and_run_returns(
    loop_factory: LoopFactory, kind: str
) -> None:
    """Issue 9, defect 8: asyncio refuses StopIteration in a future (it would end a
    generator), so `execute` raising it left `await work` hanging forever on 3.10-3.12,
    `complete` never ran, and `tsfn.run` never returned. The awaiter gets it the way a
    coroutine passes StopIteration on (PEP 479: a RuntimeError caused by it), `complete`
    gets Status.ERROR, and tsfn.run returns once an unawaited one has completed too."""
    completed: list[Status] = []
    caught: list[BaseException] = []

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            executor = pool if kind == "explicit" else None
            work = AsyncWork(
                _raise_stop_iteration, lambda s, _: completed.append(s), executor=executor
            )
            try:
                await asyncio.wait_for(work, 10)  # a bound for a hang, not for speed
            except (StopIteration, RuntimeError) as exc:
                caught.append(exc)
            # Never awaited: tsfn.run waits for its complete, and must get it.
            AsyncWork(
                _raise_stop_iteration, lambda s, _: completed.append(s), executor=executor
            ).queue()

    tsfn.run(main(), loop_factory=loop_factory)
    [exc] = caught
    original = exc if isinstance(exc, StopIteration) else exc.__cause__
    assert isinstance(original, StopIteration), repr(exc)
    assert original.args == ("from execute",)
    assert completed == [Status.ERROR, Status.ERROR]


async def test_execute_raising_stop_iteration_in_a_process_pool_reaches_the_awaiter() -> None:
    """Issue 9, defect 8, in another process: what carries StopIteration out of the
    worker must survive pickling, or the parent cannot read the result, the process
    pool is broken for every other work (BrokenProcessPool), and the awaiter gets
    that instead of the worker's exception."""
    complete = RecordingComplete()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        work = AsyncWork(_raise_stop_iteration, complete, executor=pool)
        with pytest.raises((StopIteration, RuntimeError)) as caught, anyio.fail_after(WAIT):
            await work
        # The pool still works for the next work.
        assert await AsyncWork(_execute_in_child, data=1, executor=pool) is not None
    exc = caught.value
    original = exc if isinstance(exc, StopIteration) else exc.__cause__
    assert isinstance(original, StopIteration), repr(exc)
    assert [s for s, _, _ in complete.calls] == [Status.ERROR]


async def test_an_async_complete_is_awaited_or_refused_never_dropped() -> None:
    """Sibling of issue 9, defect 16: `complete` written as `async def` returns a
    coroutine; dropping it ("coroutine ... was never awaited") skips it in silence.
    Either refuse it (TypeError naming `complete`) or await it before the work is
    done."""
    ran: list[Status] = []

    async def complete(status: Status, _: object) -> None:
        await anyio.lowlevel.checkpoint()
        ran.append(status)

    try:
        work = AsyncWork(lambda d: d, complete, data=1)  # the mistake under test
    except TypeError as exc:
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "complete" in refused
        return
    assert await work == 1
    gc.collect()  # a dropped coroutine warns here, inside the test
    assert ran == [Status.OK]


async def test_complete_may_be_omitted() -> None:
    # Node allows a NULL complete: completion then does nothing.
    assert await AsyncWork(lambda d: d * 3, data=3) == 9


# -- cancel() before start, while running, after done ----------------------------------


@executor_kinds
async def test_AW3_cancel_before_start_never_runs_and_completes_cancelled(kind: str) -> None:
    ran: list[object] = []
    complete = RecordingComplete()
    with parked_pool(kind) as parked:
        work = AsyncWork(ran.append, complete, data="payload", executor=parked.for_work)
        work.queue()
        assert work.cancel() is True
        # A second cancel finds nothing to cancel (Node: napi_generic_failure).
        assert work.cancel() is False
        # Like Node, complete comes later from the loop, never inside cancel().
        assert complete.calls == []
        await complete.done.wait()
        with pytest.raises(asyncio.CancelledError):
            await work
        # Let the pool's worker reach the cancelled job: it must skip it.
        parked.unpark()
    assert ran == []
    assert [(s, d) for s, d, _ in complete.calls] == [(Status.CANCELLED, "payload")]
    assert complete.calls[0][2] == threading.get_ident()
    assert work.status is Status.CANCELLED


@executor_kinds
async def test_W2_cancel_while_running_returns_false_and_the_work_finishes(kind: str) -> None:
    started = anyio.Event()
    finish = threading.Event()
    signal_started = set_from_worker(started)

    def execute(d: int) -> int:
        signal_started()
        finish.wait()
        return d + 1

    complete = RecordingComplete()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    if kind == "default":
        use_as_default(pool)
    try:
        work = AsyncWork(execute, complete, data=1, executor=pool if kind == "explicit" else None)
        work.queue()
        await started.wait()
        assert work.cancel() is False  # Node: napi_generic_failure
        finish.set()
        assert await work == 2
    finally:
        finish.set()
        pool.shutdown(wait=True)
    assert [(s, d) for s, d, _ in complete.calls] == [(Status.OK, 1)]


async def test_cancel_after_done_returns_false() -> None:
    complete = RecordingComplete()
    work = AsyncWork(lambda d: d, complete, data=7)
    assert await work == 7
    assert work.cancel() is False
    assert await work == 7  # still the result; nothing changed
    assert len(complete.calls) == 1


async def test_cancel_before_queue_returns_false() -> None:
    work = AsyncWork(lambda d: d, data=7)
    assert work.cancel() is False
    assert await work == 7


@executor_kinds
def test_cancel_after_a_bare_loop_close_raises_nothing(
    loop_factory: LoopFactory, kind: str
) -> None:
    """Issue 9, defect 10: `cancel()` of a work still waiting for a worker, after its
    loop was closed directly with `loop.close()`, raised RuntimeError('Event loop is
    closed'), which docs/guarantees.md says nobody sees. It cancels (the work never
    runs); `complete` cannot run on a closed loop (API.md)."""
    ran: list[object] = []
    completed: list[Status] = []

    async def queue_behind_a_busy_worker() -> tuple[ParkedPool, AsyncWork[object, None]]:
        parked = ParkedPool(kind)
        work = AsyncWork(ran.append, lambda s, _: completed.append(s), executor=parked.for_work)
        return parked, work.queue()

    loop = loop_factory()
    try:
        parked, work = loop.run_until_complete(queue_behind_a_busy_worker())
    finally:
        loop.close()
    try:
        assert work.cancel() is True
        assert work.cancel() is False
    finally:
        parked.close()  # the worker reaches the cancelled job, and skips it
    assert ran == []
    assert completed == []


# -- executors ---------------------------------------------------------------------------


@pytest.mark.asyncio_only("trio has no default executor (test_trio.py checks its threads)")
async def test_the_loops_default_executor_is_honoured() -> None:
    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="my-default") as pool:
        asyncio.get_running_loop().set_default_executor(pool)
        name = await AsyncWork(lambda _: threading.current_thread().name)
    assert name.startswith("my-default")


async def test_an_explicit_executor_is_used_instead_of_the_default() -> None:
    with (
        concurrent.futures.ThreadPoolExecutor(thread_name_prefix="my-default") as default,
        concurrent.futures.ThreadPoolExecutor(thread_name_prefix="explicit") as explicit,
    ):
        use_as_default(default)
        name = await AsyncWork(lambda _: threading.current_thread().name, executor=explicit)
    assert name.startswith("explicit")


def _execute_in_child(data: int) -> tuple[int, bool, int]:
    # Module level, so a process pool can pickle it by reference.
    return os.getpid(), tsfn.cancelled(), data * 2


async def test_a_process_pool_runs_picklable_work_in_another_process() -> None:
    complete = RecordingComplete()
    # spawn: forking a multi-threaded test process is unsafe (and warns on 3.12+).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        work = AsyncWork(_execute_in_child, complete, data=21, executor=pool)
        pid, was_cancelled, doubled = await work
    assert pid != os.getpid()
    assert was_cancelled is False
    assert doubled == 42
    assert [(s, d, t) for s, d, t in complete.calls] == [(Status.OK, 21, threading.get_ident())]


# -- cancelling the awaiting task ------------------------------------------------------


@executor_kinds
async def test_cancelling_the_awaiting_task_cancels_a_work_not_yet_started(kind: str) -> None:
    ran: list[object] = []
    complete = RecordingComplete()
    with parked_pool(kind) as parked:
        work = AsyncWork(ran.append, complete, data="d", executor=parked.for_work)
        await _cancel_the_task_awaiting(work)
        await complete.done.wait()
        parked.unpark()
    assert ran == []
    assert [(s, d) for s, d, _ in complete.calls] == [(Status.CANCELLED, "d")]
    assert work.status is Status.CANCELLED


@executor_kinds
async def test_a_started_work_sees_cancelled_once_its_awaiting_task_is_cancelled(
    kind: str,
) -> None:
    started = anyio.Event()
    signal_started = set_from_worker(started)
    seen_before: list[bool] = []

    def execute(_: object) -> str:
        seen_before.append(tsfn.cancelled())
        signal_started()
        while not tsfn.cancelled():
            time.sleep(0.001)  # simulated work between polls; any length is correct
        return "stopped early"

    complete = RecordingComplete()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    if kind == "default":
        use_as_default(pool)
    try:
        work = AsyncWork(execute, complete, executor=pool if kind == "explicit" else None)
        await _cancel_the_task_awaiting(work, started)
        # The work was running, so it is not cancelled: it stops on its own and
        # completes normally.
        await complete.done.wait()
    finally:
        pool.shutdown(wait=True)
    assert seen_before == [False]
    assert [s for s, _, _ in complete.calls] == [Status.OK]
    assert await work == "stopped early"


async def _cancel_the_task_awaiting(
    work: AsyncWork[Any, Any], started: anyio.Event | None = None
) -> None:
    """Await `work` in a task; cancel that task once it awaits (and `started` is set)."""
    awaiting = anyio.Event()

    async def waiter() -> None:
        awaiting.set()  # no suspension between this and the await below
        await work
        raise AssertionError("the awaiting task was never cancelled")

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(waiter)
            await awaiting.wait()  # the task now sits in `await work`
            if started is not None:
                await started.wait()
            scope.cancel()
    assert scope.cancelled_caught, "the cancellation did not reach the awaiting task"


async def test_cancelled_is_false_outside_workers() -> None:
    assert tsfn.cancelled() is False  # on the loop thread

    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(tsfn.cancelled()))
    thread.start()
    thread.join()
    assert seen == [False]

    assert await anyio.to_thread.run_sync(tsfn.cancelled) is False


async def test_a_pool_thread_forgets_the_cancelled_flag_after_the_work() -> None:
    # A flag set for one work must not leak into the next job on the same thread.
    started = anyio.Event()
    signal_started = set_from_worker(started)

    def execute(_: object) -> None:
        signal_started()
        while not tsfn.cancelled():
            time.sleep(0.001)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        complete = RecordingComplete()
        await _cancel_the_task_awaiting(AsyncWork(execute, complete, executor=pool), started)
        await complete.done.wait()
        assert await result_of(pool.submit(tsfn.cancelled)) is False
        assert await AsyncWork(lambda _: tsfn.cancelled(), executor=pool) is False


@executor_kinds
async def test_cancel_racing_the_start_either_cancels_or_runs_never_both(
    kind: str, tiny_switch_interval: None
) -> None:
    # cancel() and a worker picking the job up race; whichever wins, the outcome is
    # consistent: True means execute never ran and complete got CANCELLED, False
    # means it ran and complete got OK. complete runs exactly once either way.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    if kind == "default":
        use_as_default(pool)
    try:
        ran: set[int] = set()
        completions: dict[int, list[Status]] = {i: [] for i in range(200)}
        works = []
        for i in range(200):
            work = AsyncWork(
                ran.add,
                lambda status, d: completions[d].append(status),
                data=i,
                executor=pool if kind == "explicit" else None,
            )
            work.queue()
            works.append((work, work.cancel()))
        for work, _ in works:
            with contextlib.suppress(asyncio.CancelledError):
                await work
    finally:
        pool.shutdown(wait=True)
    for i, (_work, was_cancelled) in enumerate(works):
        expected = Status.CANCELLED if was_cancelled else Status.OK
        assert completions[i] == [expected]
        assert (i in ran) is not was_cancelled
