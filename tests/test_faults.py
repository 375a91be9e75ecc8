"""Faults in user code and in the loop run: each is reported, and nothing else changes.

Each fault is reported (to whoever awaits the result here; to the loop's exception
handler in test_asyncio_loop.py), and then: later items are still delivered,
discarded items are still handed to `call_js`, counts stay exact and the finalizer
runs once. KeyboardInterrupt and SystemExit are not faults to report but requests to
stop: they propagate out of the loop run, and the next run carries on where it stopped.

The tests that stop an asyncio loop's run and run it again take `loop_factory`: only an
asyncio loop runs again after a run was interrupted. The rest run on every loop.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import gc
import logging
import threading

import anyio
import pytest
from _helpers import Backend, Boom, run_on, run_to_end
from _loops import LoopFactory, asyncio_run

import tsfn

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


# -- faults reach the awaiter --------------------------------------------------------


async def test_raising_execute_reaches_the_awaiter_and_complete_gets_error() -> None:
    completions: list[tuple[tsfn.Status, object]] = []

    def execute(data: str) -> None:
        raise Boom(data)

    work = tsfn.AsyncWork(
        execute, lambda status, data: completions.append((status, data)), data="d"
    )
    with pytest.raises(Boom, match="d"):
        await work
    assert completions == [(tsfn.Status.ERROR, "d")]
    assert work.status is tsfn.Status.ERROR


@pytest.mark.parametrize(
    "default",
    [
        pytest.param(False, id="own_executor"),
        pytest.param(
            True,
            id="default_executor",
            marks=pytest.mark.asyncio_only("trio's worker threads cannot be shut down"),
        ),
    ],
)
def test_work_on_a_shut_down_executor_raises_to_the_caller(
    anyio_backend: Backend, default: bool
) -> None:
    """The executor refuses the job: the awaiting caller hears so and tsfn.run still ends."""
    completions: list[tsfn.Status] = []

    async def main() -> BaseException | None:
        executor = concurrent.futures.ThreadPoolExecutor(1)
        executor.shutdown()
        if default:
            await asyncio.get_running_loop().shutdown_default_executor()
        work: tsfn.AsyncWork[None, str] = tsfn.AsyncWork(
            lambda _: "never",
            lambda status, _: completions.append(status),
            executor=None if default else executor,
        )
        try:
            await work
        except RuntimeError as exc:
            return exc
        return None

    # tsfn.run would hang if the refused work still held the loop alive.
    assert isinstance(run_on(anyio_backend, main), RuntimeError)
    assert completions == []  # never queued, so never completed (Node: an error status)


async def test_awaiting_a_refused_work_again_raises_instead_of_hanging() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(1)
    executor.shutdown()
    work: tsfn.AsyncWork[None, str] = tsfn.AsyncWork(lambda _: "never", executor=executor)
    with pytest.raises(RuntimeError):
        await work
    # A second await must fail the same way, not wait for a job that never existed.
    with pytest.raises(RuntimeError), anyio.fail_after(1):
        await work


# -- KeyboardInterrupt and SystemExit stop the loop run, and nothing is lost -------------
#
# Asyncio only up to the shutdown tests: each runs an asyncio loop again after the
# interrupted run; a trio run that an interrupt ended is over.


def _run_until_interrupted(loop: asyncio.AbstractEventLoop, exc_type: type[BaseException]) -> None:
    """Run `loop` until `exc_type` escapes it; fail (not hang) if it is swallowed."""
    guard = loop.call_later(5, loop.stop)
    try:
        with pytest.raises(exc_type):
            loop.run_forever()
    finally:
        guard.cancel()


@pytest.mark.parametrize("max_queue_size", [0, 8], ids=["unbounded", "bounded"])
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_interrupt_in_callback_propagates_and_the_next_run_delivers_the_rest(
    loop_factory: LoopFactory, exc_type: type[BaseException], max_queue_size: int
) -> None:
    attempted: list[int] = []
    delivered: list[int] = []
    finalized: list[int] = []

    def callback(item: int) -> None:
        attempted.append(item)
        if item == 3:
            raise exc_type
        delivered.append(item)

    async def drained(fn: tsfn.ThreadsafeFunction[int]) -> None:
        while fn.qsize():  # noqa: ASYNC110 - the loop itself empties the queue
            await asyncio.sleep(0)

    loop = loop_factory()
    try:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            callback,
            loop=loop,
            max_queue_size=max_queue_size,
            finalizer=lambda _: finalized.append(len(attempted)),
        )
        for item in range(8):
            fn.call(item)  # the loop is not running: everything waits in the queue
        _run_until_interrupted(loop, exc_type)
        loop.run_until_complete(drained(fn))  # the next run goes on after item 3
        assert attempted == list(range(8))  # nothing twice, nothing skipped
        if max_queue_size:
            # The slots of the items the interrupted batch handed back were counted
            # once: the queue takes exactly max_queue_size items again.
            for item in range(8, 8 + max_queue_size):
                fn.call_nowait(item)
            with pytest.raises(tsfn.QueueFull):
                fn.call_nowait(99)
        fn.release()
        loop.run_until_complete(fn.wait_closed())
    finally:
        loop.close()

    expected = [i for i in range(8 + max_queue_size) if i != 3]
    assert delivered == expected
    assert finalized == [len(expected) + 1]
    assert fn.qsize() == 0


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_interrupt_in_submitted_callback_propagates_and_settles_its_future(
    loop_factory: LoopFactory, exc_type: type[BaseException]
) -> None:
    def callback(item: int) -> int:
        if item == 1:
            raise exc_type
        return item

    loop = loop_factory()
    try:
        fn = tsfn.ThreadsafeFunction(callback, loop=loop)
        futures = [fn.submit(i) for i in range(4)]
        fn.release()
        _run_until_interrupted(loop, exc_type)
        loop.run_until_complete(fn.wait_closed())
    finally:
        loop.close()

    assert [futures[i].result() for i in (0, 2, 3)] == [0, 2, 3]
    assert isinstance(futures[1].exception(), exc_type)  # settled, not pending forever


def test_interrupt_in_call_js_while_discarding_propagates_and_the_rest_are_discarded(
    loop_factory: LoopFactory,
) -> None:
    discarded: list[int] = []
    events: list[str] = []

    def call_js(
        loop: asyncio.AbstractEventLoop | None, _cb: object, _context: object, item: int
    ) -> None:
        discarded.append(item)
        if item == 2:
            raise KeyboardInterrupt

    loop = loop_factory()
    try:
        fn = tsfn.ThreadsafeFunction(
            call_js=call_js, loop=loop, finalizer=lambda _: events.append("final")
        )
        for item in range(6):
            fn.call(item)
        fn.abort()
        _run_until_interrupted(loop, KeyboardInterrupt)
        loop.run_until_complete(asyncio.wait_for(fn.wait_closed(), 5))
    finally:
        loop.close()

    assert discarded == list(range(6))
    assert events == ["final"]


def test_interrupt_in_finalizer_propagates_and_the_finalizer_never_runs_again(
    loop_factory: LoopFactory,
) -> None:
    calls: list[object] = []

    def finalizer(context: object) -> None:
        calls.append(context)
        raise KeyboardInterrupt

    loop = loop_factory()
    try:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            lambda _: None, loop=loop, finalizer=finalizer
        )
        fn.call(1)
        fn.release()
        _run_until_interrupted(loop, KeyboardInterrupt)
        assert fn.closed
        loop.run_until_complete(fn.wait_closed())
        fn.abort()  # idempotent, and must not re-run the finalizer
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert calls == [None]


# Where the raising hook sits at shutdown: a finalizer, or call_js discarding an item.
# Items are still queued at shutdown only under tsfn.run, which aborts unreferenced
# functions right after `main` returns, with no loop turn between (asyncio.run's loop
# turns once more and delivers them).
# ("run": the loop's own runner, asyncio.run or trio.run.)
SHUTDOWN_HOOKS = [("run", "finalizer"), ("tsfn.run", "finalizer"), ("tsfn.run", "call_js")]


@pytest.mark.parametrize(
    ("ending", "where"), SHUTDOWN_HOOKS, ids=["-".join(c) for c in SHUTDOWN_HOOKS]
)
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_at_loop_shutdown_still_shuts_every_function_down(
    anyio_backend: Backend,
    exc_type: type[BaseException],
    ending: str,
    where: str,
) -> None:
    """Issue 9, defect 7: at loop shutdown, one function's finalizer (or call_js) raising
    SystemExit or KeyboardInterrupt left every other function of that loop open and
    unfinalized. Every function is shut down, then the exception propagates.

    Two of the three functions raise: the loop shuts its functions down in no
    particular order, and with two raising, one of them always comes before another
    function, so the test cannot pass by luck of the order."""
    names = ("raises-1", "quiet", "raises-2")
    finalized: list[str] = []
    discarded: list[tuple[str, int]] = []

    def make(name: str) -> tsfn.ThreadsafeFunction[int]:
        raising = name != "quiet"

        def call_js(loop: object, callback: object, context: object, data: int) -> None:
            if loop is None:
                discarded.append((name, data))
                if raising and where == "call_js" and data == 0:
                    raise exc_type(name)

        def finalizer(_: object) -> None:
            finalized.append(name)
            if raising and where == "finalizer":
                raise exc_type(name)

        return tsfn.ThreadsafeFunction(call_js=call_js, finalizer=finalizer, name=name)

    async def main() -> None:
        for fn in map(make, names):
            fn.unref()  # tsfn.run: do not wait for it; asyncio.run: no difference
            fn.call(0)
            fn.call(1)

    def run() -> None:
        if ending == "run":
            run_to_end(anyio_backend, main)
        else:
            run_on(anyio_backend, main)

    with pytest.raises(exc_type):
        run()
    assert sorted(finalized) == sorted(names)  # each once, the raising ones included
    if where == "call_js":
        assert sorted(discarded) == [(name, i) for name in sorted(names) for i in (0, 1)]
    # The old shutdown left the interpreter unable to parse on 3.11 (see the next
    # test): that struck when a leftover task was collected during a parse.
    gc.collect()
    ast.parse("x = 1")


def test_an_interrupt_at_loop_shutdown_is_not_logged_again_when_collected(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 9, defect 7, what was left of it. asyncio.run's shutdown runs tsfn's
    shutdown in a task (shutdown_asyncgens gathers the probe's `aclose()`). The
    interrupt a finalizer raises must propagate out of asyncio.run, but a task that
    raises it keeps it, and asyncio's own loop, stopped by it, never retrieves it:
    when the task was collected, asyncio logged "Task exception was never retrieved".
    On 3.11, when that collection happened inside an `ast.parse` (pytest formatting a
    failure, say), the log formatted a traceback, which parses source again, and the
    outer `ast.parse` raised `SystemError: AST constructor recursion depth mismatch`:
    the issue's "corrupted interpreter". (uvloop's loop retrieves the exception.)
    Asyncio only: asyncio's tasks and logger."""

    def finalizer(_: object) -> None:
        raise SystemExit("from the finalizer")

    async def main() -> None:
        tsfn.ThreadsafeFunction(lambda _: None, finalizer=finalizer)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(SystemExit):
            asyncio_run(main(), loop_factory)
        gc.collect()  # whatever still holds the interrupt goes now, and logs if it would
    assert "never retrieved" not in caplog.text


def test_call_js_raising_for_every_discard_at_shutdown_still_discards_and_finalizes_all(
    anyio_backend: Backend,
) -> None:
    """Sibling of issue 9, defect 7: call_js raising SystemExit for *each* discarded
    item. The first raise used to propagate through Port.shutdown(), which went on
    with the other functions; the function's remaining discards were rescheduled as a
    loop callback, and that callback's raise escaped the loop while Port.shutdown()
    waited: the raising functions kept items never discarded and were never
    finalized. Every item must be discarded and every function finalized, then the
    interrupt raised."""
    names = ("raises-1", "quiet", "raises-2")
    finalized: list[str] = []
    discarded: list[tuple[str, int]] = []

    def make(name: str) -> tsfn.ThreadsafeFunction[int]:
        def call_js(loop: object, callback: object, context: object, data: int) -> None:
            if loop is None:
                discarded.append((name, data))
                if name != "quiet":
                    raise SystemExit(name)

        return tsfn.ThreadsafeFunction(
            call_js=call_js, finalizer=lambda _: finalized.append(name), name=name
        )

    async def main() -> None:
        for fn in map(make, names):
            fn.unref()
            for item in range(3):
                fn.call(item)

    with pytest.raises(SystemExit):
        run_on(anyio_backend, main)
    gc.collect()  # the stranded tasks complain now, not in a later test
    assert sorted(discarded) == [(name, i) for name in sorted(names) for i in range(3)]
    assert sorted(finalized) == sorted(names)


def test_complete_raising_at_shutdown_lets_the_other_members_finish_first(
    loop_factory: LoopFactory,
) -> None:
    """Sibling of issue 9, defect 7: an AsyncWork cancelled by the shutdown runs
    `complete` from a loop callback; `complete` raising SystemExit there stopped the
    loop while a function's cancelled async callback still ran its cleanup, so that
    function was never finalized ("Task was destroyed but it is pending!").
    Asyncio only: a task that outlives `main`, cancelled by asyncio.run."""
    order: list[str] = []
    gate = threading.Event()  # parks the default executor's only worker
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def complete(status: tsfn.Status, _: object) -> None:
        order.append(f"complete {status.name}")
        gate.set()
        raise SystemExit("from complete")

    async def callback(_: object) -> None:
        order.append("callback started")
        try:
            await asyncio.Event().wait()
        finally:
            for _ in range(3):  # cleanup that needs the loop, a turn at a time
                await asyncio.sleep(0)
            order.append("cleanup done")

    holder: list[asyncio.Task[None]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(pool)
        pool.submit(gate.wait)
        fn = tsfn.ThreadsafeFunction(callback, finalizer=lambda _: order.append("finalizer"))
        tsfn.AsyncWork(lambda _: None, complete).queue()  # waits for the parked worker
        parked = asyncio.Event()

        async def calls_when_cancelled() -> None:
            # asyncio.run cancels this task and waits for it; the callback it starts
            # then is still running when tsfn's shutdown begins.
            try:
                parked.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                fn.call(None)
                raise

        holder.append(asyncio.ensure_future(calls_when_cancelled()))
        await parked.wait()

    try:
        with pytest.raises(SystemExit):
            asyncio_run(main(), loop_factory)
    finally:
        gate.set()
        pool.shutdown(wait=True)
        gc.collect()  # the stranded task complains now, not in a later test
    assert order[0] == "callback started"
    assert sorted(order[1:]) == ["cleanup done", "complete CANCELLED", "finalizer"]
    assert order.index("cleanup done") < order.index("finalizer")
