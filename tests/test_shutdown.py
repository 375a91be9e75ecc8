"""The loop ends while work is in flight: nobody hangs, nobody sees RuntimeError.

Every scenario runs under each way a loop can end (`ENDINGS`) and on each loop kind
(`anyio_backend`: asyncio's loop, uvloop, trio):

- ``run``: the loop's own runner returns. ``asyncio.run`` (uvloop's before 3.12,
  which takes no loop factory: an asyncio.Runner, as below): tasks are cancelled,
  then async generators are shut down (tsfn's hook: open functions are aborted,
  finalizers run), then the default executor is joined. ``trio.run``: once `main`
  has returned, trio cancels its system tasks, and tsfn's aborts the open
  functions, finalizers included.
- ``asyncio.Runner`` closes (on 3.10, which has no Runner, the same steps by hand):
  as asyncio.run. Asyncio only.
- ``tsfn.run`` ends because `main` raised: it shuts the loop down at once, with
  everything still open.
- ``loop.close`` with nothing before it: no hook runs. API.md promises only that
  calls raise `Closing` and blocked callers wake with `Closing`; finalizers,
  `complete` and the undelivered items' `call_js` cannot run on a closed loop.
  Asyncio only: a trio run cannot be closed from outside.

What each test checks: every producer and worker wakes with `Closing` (or is told
through `tsfn.cancelled()`) within `WAKE_BOUND` of `main` returning; no thread, loop
exception handler or log record sees an unexpected exception; what was accepted is
delivered or discarded exactly once (where the finalizer can run); finalizers and
`complete` run exactly once where they can and never where they cannot; every
thread has finished when the test ends.

Further down, the same promises without the `ENDINGS` matrix: one function fed by one
producer as the loop's runner (on every loop) or an `asyncio.Runner` ends, a function
created by an executor job during the shutdown, and what a function whose loop was
closed directly still refuses and allows. Those that step an asyncio loop by hand (a
loop closed directly, a Runner between runs, a subclass of the loop, its
first-iteration hook) are asyncio's by nature and take `loop_factory`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio
from _helpers import (
    WAIT,
    Backend,
    Worker,
    asyncio_loop,
    blocked_callers,
    join_all,
    loop_factory_of,
    run_on,
    start,
    start_threads,
    until,
    wait_until,
)
from _loops import LoopFactory, asyncio_run

import tsfn
from tsfn._running import running_port

pytestmark = pytest.mark.timeout(40)

Main = Callable[[], Coroutine[Any, Any, None]]

ENDINGS = [
    "run",
    pytest.param("asyncio.Runner", marks=pytest.mark.asyncio_only("an asyncio.Runner")),
    "tsfn.run",
    pytest.param("loop.close", marks=pytest.mark.asyncio_only("loop.close()")),
]
# The endings that shut the loop down (all but a bare loop.close()).
SHUTDOWNS = ENDINGS[:3]

# "Wakes within a second": the only timing these tests assert. A blocked caller is
# woken at once by the shutdown hook, or within tsfn's 0.1 s poll after a bare
# loop.close(); the rest is margin for a loaded 2-core machine.
WAKE_BOUND = 1.0


class MainEnded(Exception):
    """Raised at the end of `main` under tsfn.run, so that the loop ends at once."""


# -- the four ways a loop ends ------------------------------------------------------------
#
# Those of asyncio take the loop factory; "run" and "tsfn.run" take the backend.


def _runner_run(main: Main, loop_factory: LoopFactory) -> None:
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
        return
    # Python 3.10 has no asyncio.Runner: the same steps, by hand.
    asyncio_run(main(), loop_factory)  # pragma: no cover - 3.10 only


def _asyncio_run(main: Main, loop_factory: LoopFactory) -> None:
    if sys.version_info >= (3, 12):
        asyncio.run(main(), loop_factory=loop_factory)
    elif loop_factory is asyncio.new_event_loop:
        asyncio.run(main())
    else:  # asyncio.run takes no loop factory before 3.12; it is a Runner inside
        _runner_run(main, loop_factory)


def _run(main: Main, backend: Backend) -> None:
    if backend[0] == "trio":
        trio.run(main)
    else:
        _asyncio_run(main, loop_factory_of(backend))


def _tsfn_run(main: Main, backend: Backend) -> None:
    async def failing() -> None:
        await main()
        raise MainEnded

    with pytest.raises(MainEnded):
        run_on(backend, failing)


def _close_run(main: Main, loop_factory: LoopFactory) -> None:
    loop = loop_factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def end_loop(ending: str, main: Main, backend: Backend) -> None:
    """Run `main` on a new loop of `backend`'s kind, then end it the way `ending` names."""
    if ending == "run":
        _run(main, backend)
    elif ending == "tsfn.run":
        _tsfn_run(main, backend)
    else:
        {"asyncio.Runner": _runner_run, "loop.close": _close_run}[ending](
            main, loop_factory_of(backend)
        )


# -- bookkeeping shared by the scenarios -------------------------------------------------


class Ledger:
    """What producers, the loop and the finalizer saw, from whichever thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[int] = []
        self.delivered: list[int] = []  # loop thread only, like everything call_js sees
        self.discarded: list[int] = []
        self.finalized = 0
        self.late: list[int] = []  # items handed over after the finalizer: must stay empty
        self.woke: list[float] = []  # when each producer got Closing
        self.errors: list[BaseException] = []  # anything unexpected, from any thread
        self.reports: list[dict[str, Any]] = []  # what reached the loop's handler
        self.main_ended = 0.0

    def accept(self, item: int) -> None:
        with self.lock:
            self.accepted.append(item)

    def closing(self) -> None:
        with self.lock:
            self.woke.append(time.monotonic())

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)

    def call_js(
        self,
        loop: object,  # the asyncio loop, trio's token, or None
        callback: Callable[[int], object] | None,
        _context: object,
        item: int,
    ) -> object:
        if self.finalized:
            self.late.append(item)
        if loop is None:
            self.discarded.append(item)
            return None
        self.delivered.append(item)
        return callback(item) if callback is not None else None

    def finalizer(self, _context: object) -> None:
        self.finalized += 1

    def producer(self, body: Callable[[], object]) -> Callable[[], None]:
        """A thread target that runs `body` and books how it ended: `Closing`, or an error."""

        def run() -> None:
            try:
                body()
            except tsfn.Closing:
                self.closing()
            except BaseException as exc:
                self.error(exc)

        return run

    def function(
        self,
        max_queue_size: int,
        producers: int,
        callback: Callable[[int], object] = lambda _: None,
    ) -> tsfn.ThreadsafeFunction[int]:
        """A function on the running loop whose every hand-over this ledger books."""
        return tsfn.ThreadsafeFunction(
            callback,
            call_js=self.call_js,
            max_queue_size=max_queue_size,
            initial_thread_count=producers,
            finalizer=self.finalizer,
        )

    def watch_loop(self) -> None:
        """Send the running loop's error reports here (call at the start of main).

        On trio, which has no handler, tsfn logs them, and the `ledger` fixture fails
        the test on any error logged."""
        loop = asyncio_loop()
        if loop is not None:
            loop.set_exception_handler(lambda _loop, context: self.reports.append(context))

    def check(self, ending: str, producers: int) -> None:
        assert self.errors == [], f"unexpected exceptions: {self.errors!r}"
        runtime = [c for c in self.reports if isinstance(c.get("exception"), RuntimeError)]
        assert runtime == [], f"RuntimeError reported to the loop: {runtime!r}"
        if ending != "loop.close":
            assert self.reports == [], f"unexpected loop error reports: {self.reports!r}"
        assert len(self.woke) == producers, "a producer never got Closing"
        late = [t - self.main_ended for t in self.woke if t - self.main_ended > WAKE_BOUND]
        assert late == [], f"producers woke {late} s after the loop began to end"
        handed_over = self.delivered + self.discarded
        assert len(set(handed_over)) == len(handed_over), "an item was handed over twice"
        assert set(handed_over) <= set(self.accepted), "an item nobody called with came out"
        assert self.late == [], "items handed over after the finalizer"
        if ending == "loop.close":
            # The finalizer cannot run on a closed loop; nor can the leftovers' call_js.
            assert self.finalized == 0
        else:
            assert self.finalized == 1
            assert sorted(handed_over) == sorted(self.accepted), "accepted items were lost"


@pytest.fixture
def ledger(caplog: pytest.LogCaptureFixture) -> Iterator[Ledger]:
    """A Ledger; the test also fails if anything logged an error meanwhile."""
    book = Ledger()
    with caplog.at_level(logging.ERROR):
        yield book
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], f"errors were logged: {errors}"


def use_as_default(executor: concurrent.futures.Executor) -> None:
    """Make `executor` the running asyncio loop's default, so that the test can join its
    threads. On trio, whose worker threads are its own, nothing."""
    loop = asyncio_loop()
    if loop is not None:
        loop.set_default_executor(executor)


def leave_running(task: Main) -> asyncio.Task[None] | None:
    """Start `task()` beside `main`, still running when `main` returns: an asyncio task
    (returned), or on trio a system task, the only kind a trio run lets outlive `main`."""
    if asyncio_loop() is None:
        trio.lowlevel.spawn_system_task(task)
        return None
    return asyncio.ensure_future(task())


def shut_down(executor: concurrent.futures.Executor) -> None:
    """Join `executor`'s threads, failing (not hanging) if one never returns."""
    joiner = threading.Thread(target=executor.shutdown, kwargs={"wait": True})
    joiner.start()
    join_all([joiner])


# -- producers blocked on a full queue ----------------------------------------------------


def blocking_producer(
    fn: tsfn.ThreadsafeFunction[int], ledger: Ledger, first: int, timeout: float | None
) -> Callable[[], None]:
    def produce() -> None:
        for item in range(first, first + 1_000_000):
            fn.call(item, timeout=timeout)
            ledger.accept(item)

    return ledger.producer(produce)


@pytest.mark.parametrize("ending", ENDINGS)
def test_producers_blocked_on_a_full_queue_wake_with_closing(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    producers = 8
    threads: list[threading.Thread] = []

    async def main() -> None:
        ledger.watch_loop()
        fn = ledger.function(2, producers)
        # Half wait without a timeout, half with one far longer than the test: both
        # must be woken by the shutdown, not by their timeout.
        threads.extend(
            start_threads(
                [
                    blocking_producer(fn, ledger, 1_000_000 * p, None if p % 2 else 60.0)
                    for p in range(producers)
                ]
            )
        )
        # Let them fill the queue and park; the loop drains while we wait.
        await until(lambda: len(ledger.accepted) >= 50)
        ledger.main_ended = time.monotonic()

    end_loop(ending, main, anyio_backend)
    join_all(threads)
    ledger.check(ending, producers)


def test_unreferenced_function_with_blocked_producers_does_not_keep_tsfn_run_alive(
    anyio_backend: Backend, ledger: Ledger
) -> None:
    """tsfn.run returning normally aborts the unref'd function and wakes its producers."""
    producers = 4
    threads: list[threading.Thread] = []

    async def main() -> None:
        ledger.watch_loop()
        fn = ledger.function(1, producers)
        fn.unref()
        threads.extend(
            start_threads(
                [blocking_producer(fn, ledger, 1_000_000 * p, None) for p in range(producers)]
            )
        )
        await until(lambda: len(ledger.accepted) >= 20)
        ledger.main_ended = time.monotonic()

    run_on(anyio_backend, main)
    join_all(threads)
    ledger.check("tsfn.run", producers)


# -- mid-drain: an (async) callback is running when the shutdown starts --------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_callback_running_at_shutdown_is_cancelled_and_the_rest_discarded(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    threads: list[threading.Thread] = []
    futures: list[concurrent.futures.Future[Any]] = []
    outcomes: list[str] = []

    async def main() -> None:
        ledger.watch_loop()
        running = anyio.Event()
        # Looked up now: a bare loop.close() strands the callback, and its coroutine
        # is closed when collected, later, with no loop to ask.
        cancelled = anyio.get_cancelled_exc_class()

        async def stuck(item: int) -> int:
            running.set()
            try:
                await anyio.Event().wait()  # never set: still running at shutdown
            except cancelled:
                outcomes.append("cancelled")
                raise
            return item

        def callback(item: int) -> object:
            return stuck(item) if item == 0 else None

        fn = ledger.function(4, 2, callback)
        futures.append(fn.submit(0))
        ledger.accept(0)
        fn.release()  # the remaining producer is the thread below
        threads.extend(start_threads([blocking_producer(fn, ledger, 1, None)]))
        await running.wait()
        await until(lambda: len(ledger.accepted) >= 20)
        ledger.main_ended = time.monotonic()

    end_loop(ending, main, anyio_backend)
    join_all(threads)
    ledger.check(ending, producers=1)
    if ending != "loop.close":
        # The running callback was cancelled, and so was its caller's future.
        assert outcomes == ["cancelled"]
        assert futures[0].cancelled()


class SlowCleanup:
    """An async callback whose cleanup takes several loop turns, and a finalizer, both
    recording into one list, so that the test can tell which ended first."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.started: anyio.Event | None = None

    async def callback(self, _: object) -> None:
        assert self.started is not None
        self.started.set()
        try:
            await anyio.Event().wait()  # never set: still running at shutdown
        finally:
            # Cleanup that needs the loop, a turn at a time (shielded: on trio, a
            # cancelled task's every await raises Cancelled again).
            with anyio.CancelScope(shield=True):
                for _ in range(5):
                    await anyio.lowlevel.checkpoint()
            self.order.append("cleanup done")

    def finalizer(self, _: object) -> None:
        self.order.append("finalizer")


def test_tsfn_run_finalizes_an_unreferenced_function_after_its_callbacks_cleanup(
    anyio_backend: Backend,
) -> None:
    """Issue 9, defect 15 (tsfn.run): an unreferenced function is aborted once `main`
    returns; its running async callback is cancelled, and the finalizer ran before the
    callback's `finally` had finished. The guarantee: the finalizer comes after every
    awaitable a callback returned has finished or been cancelled, cleanup included."""
    slow = SlowCleanup()

    async def main() -> None:
        slow.started = anyio.Event()
        fn = tsfn.ThreadsafeFunction(slow.callback, finalizer=slow.finalizer)
        fn.unref()  # tsfn.run does not wait for it: it is aborted after main
        fn.call(None)
        await slow.started.wait()

    run_on(anyio_backend, main)
    assert slow.order == ["cleanup done", "finalizer"]


def test_asyncio_run_finalizes_after_the_cleanup_of_a_callback_started_late(
    loop_factory: LoopFactory,
) -> None:
    """Issue 9, defect 15 (asyncio.run): asyncio.run cancels the tasks it finds, waits for
    them, then closes async generators, where tsfn's shutdown runs. A callback task
    started while those tasks were being cancelled is still running then; tsfn's
    shutdown cancels it, and must let its `finally` finish before the finalizer runs.

    Here `main`'s helper task, when asyncio.run cancels it, makes the call whose
    callback starts late. Asyncio only: a trio task cannot outlive `main`."""
    slow = SlowCleanup()
    holder: list[asyncio.Task[None]] = []

    async def main() -> None:
        slow.started = anyio.Event()
        fn = tsfn.ThreadsafeFunction(slow.callback, finalizer=slow.finalizer)
        parked = asyncio.Event()

        async def calls_when_cancelled() -> None:
            try:
                parked.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                fn.call(None)  # delivered while asyncio.run waits for its cancelled tasks
                raise

        holder.append(asyncio.ensure_future(calls_when_cancelled()))
        await parked.wait()

    asyncio_run(main(), loop_factory)
    assert slow.started is not None
    assert slow.started.is_set(), "the callback never started: rewrite this test"
    assert slow.order == ["cleanup done", "finalizer"]


# -- mid-submit: callers waiting for their futures ------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_submitters_get_a_result_or_a_cancelled_future_never_a_pending_one(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    producers = 6
    threads: list[threading.Thread] = []
    pending: list[int] = []
    cancelled: list[int] = []
    # A bare loop.close() strands what is queued (API.md: nothing can run it), so
    # there a caller may give up waiting; everywhere else a future must settle.
    patience = 0.2 if ending == "loop.close" else WAIT

    def submitter(first: int, fn: tsfn.ThreadsafeFunction[int]) -> Callable[[], None]:
        def submit_all() -> None:
            for item in range(first, first + 1_000_000):
                future = fn.submit(item)
                ledger.accept(item)
                try:
                    result = future.result(timeout=patience)
                except concurrent.futures.CancelledError:
                    cancelled.append(item)
                except concurrent.futures.TimeoutError:
                    pending.append(item)
                else:
                    assert result == 2 * item, (item, result)

        return ledger.producer(submit_all)

    async def main() -> None:
        ledger.watch_loop()

        async def doubled_later(item: int) -> int:
            await anyio.lowlevel.checkpoint()
            return 2 * item

        def callback(item: int) -> object:
            # Every third result is awaitable, so some are still running at shutdown;
            # not with a bare loop.close(), which strands such tasks (nothing can run
            # them any more), and Python then warns of never-awaited coroutines
            # whenever they happen to be collected, in whichever test runs by then.
            if item % 3 == 0 and ending != "loop.close":
                return doubled_later(item)
            return 2 * item

        fn = ledger.function(3, producers, callback)
        threads.extend(start_threads([submitter(1_000_000 * p, fn) for p in range(producers)]))
        await until(lambda: len(ledger.accepted) >= 100)
        ledger.main_ended = time.monotonic()

    end_loop(ending, main, anyio_backend)
    join_all(threads)
    ledger.check(ending, producers)
    if ending != "loop.close":
        assert pending == []
        # Only items discarded, or delivered to an awaitable still running, are cancelled.
        assert set(cancelled) <= set(ledger.discarded) | {i for i in cancelled if i % 3 == 0}


# -- mid-stream: the worker is blocked in emit() ------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_stream_worker_blocked_in_emit_wakes_with_closing_and_returns(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(2)
    returned = threading.Event()
    consumer_outcome: list[BaseException] = []
    holder: list[asyncio.Task[None] | None] = []
    cancelled: list[type[BaseException]] = []  # the loop's cancellation exception

    def worker(emit: Callable[[int], None]) -> str:
        try:
            for item in range(1_000_000):
                emit(item)
        except tsfn.Closing:
            ledger.closing()
            return "told to stop"
        except BaseException as exc:
            ledger.error(exc)
            raise
        finally:
            returned.set()
        return "ran out"

    async def main() -> None:
        ledger.watch_loop()
        use_as_default(executor)
        cancelled.append(anyio.get_cancelled_exc_class())
        three_read = anyio.Event()

        async def consume() -> None:
            try:
                async with tsfn.stream(worker, max_queue_size=1) as items:
                    async for item in items:
                        ledger.delivered.append(item)
                        if item == 2:
                            three_read.set()
                            await anyio.Event().wait()  # stay inside, mid-stream
            except BaseException as exc:
                consumer_outcome.append(exc)
                raise

        holder.append(leave_running(consume))
        await three_read.wait()
        ledger.main_ended = time.monotonic()

    end_loop(ending, main, anyio_backend)
    assert returned.wait(WAKE_BOUND), "the stream worker is still blocked in emit()"
    if ending == "loop.close":
        # The consumer task is left pending on the closed loop; garbage collection
        # will close its coroutine. Do that now, where an exception can be seen.
        assert holder[0] is not None
        try:
            holder[0].get_coro().close()
        except BaseException as exc:
            consumer_outcome.append(exc)
        assert not any(isinstance(e, RuntimeError) for e in consumer_outcome), consumer_outcome
    else:
        assert [type(e) for e in consumer_outcome] == cancelled
    shut_down(executor)
    assert ledger.delivered == [0, 1, 2]
    assert ledger.errors == []
    assert len(ledger.woke) == 1
    assert ledger.woke[0] - ledger.main_ended < WAKE_BOUND


# -- an AsyncWork is running ----------------------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS)
def test_running_async_work_is_told_to_stop_and_completes_once(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(2)
    started = threading.Event()
    returned = threading.Event()
    let_go = threading.Event()  # only a bare loop.close() needs the test to stop it
    told: list[float] = []
    completions: list[tsfn.Status] = []

    def execute(_: None) -> str:
        started.set()
        try:
            while not tsfn.cancelled():
                if let_go.wait(0.005):
                    return "let go"
            told.append(time.monotonic())
            return "told to stop"
        finally:
            returned.set()

    async def main() -> None:
        ledger.watch_loop()
        use_as_default(executor)
        tsfn.AsyncWork(execute, lambda status, _: completions.append(status)).queue()
        await until(started.is_set)
        ledger.main_ended = time.monotonic()

    end_loop(ending, main, anyio_backend)
    if ending == "loop.close":
        # Nothing tells a worker about a bare close, and complete() cannot run.
        let_go.set()
        assert returned.wait(WAIT)
        assert completions == []
    else:
        assert returned.is_set(), "the loop ended before the work returned"
        assert len(told) == 1
        assert told[0] - ledger.main_ended < WAKE_BOUND
        assert completions == [tsfn.Status.OK]  # execute returned: once, and OK
    shut_down(executor)
    assert ledger.errors == []
    assert ledger.reports == []


@pytest.mark.parametrize("ending", SHUTDOWNS)
def test_running_async_work_on_its_own_executor_completes_before_the_loop_closes(
    ending: str, anyio_backend: Backend, ledger: Ledger
) -> None:
    """Issue 9, defect 9: an AsyncWork on an explicit `executor=` still running when the
    loop ended was told through tsfn.cancelled(), but the loop closed without waiting
    for it (the shutdown joins only the loop's default executor), so `complete` never
    ran. It runs once, on the loop, before the loop closes."""
    executor = concurrent.futures.ThreadPoolExecutor(1)
    started = threading.Event()
    let_go = threading.Event()  # should the work never be told, end it after the test
    told: list[bool] = []
    completions: list[tuple[tsfn.Status, bool]] = []  # (status, the loop was closed)

    def execute(_: None) -> None:
        started.set()
        while not tsfn.cancelled():
            if let_go.wait(0.005):
                return
        told.append(True)

    async def main() -> None:
        ledger.watch_loop()
        loop = running_port("test")  # the asyncio loop or the trio run, as tsfn sees it
        tsfn.AsyncWork(
            execute,
            lambda status, _: completions.append((status, loop.is_closed())),
            executor=executor,
        ).queue()
        await until(started.is_set)

    try:
        end_loop(ending, main, anyio_backend)
    finally:
        let_go.set()
        shut_down(executor)
    assert completions == [(tsfn.Status.OK, False)]  # once, while the loop still ran
    assert told == [True]
    assert ledger.errors == []
    assert ledger.reports == []


# -- a call caught between queueing its item and waking the loop -------------------------


def test_call_whose_wake_up_meets_a_closed_loop_does_not_disown_a_discarded_item(
    loop_factory: LoopFactory,
) -> None:
    """The interleaving the random tests above hit now and then, made deterministic
    (asyncio only: it holds the wake-up in a subclass of the asyncio loop).

    A producer queues its item and, before it can wake the loop, the loop shuts down:
    the shutdown discards the item (to call_js) and the loop closes. The producer's
    wake-up then fails. Its call must not raise Closing ("did not queue its item")
    for an item that was queued and handed over.
    """
    probe = loop_factory()
    base = type(probe)
    probe.close()
    entered = threading.Event()
    resume = threading.Event()
    gated: list[threading.Thread] = []

    class PausingLoop(base):  # type: ignore[valid-type, misc]
        """Holds the gated thread's wake-up until the test says so."""

        def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() in gated:
                entered.set()
                resume.wait(WAIT)
            return super().call_soon_threadsafe(*args, **kwargs)

    handed_over: list[object] = []
    outcome: list[object] = []

    def call_js(loop: object, _cb: object, _context: object, item: str) -> None:
        handed_over.append(("discarded" if loop is None else "delivered", item))

    async def main() -> None:
        fn = tsfn.ThreadsafeFunction(call_js=call_js, finalizer=handed_over.append)

        def produce() -> None:
            try:
                fn.call("item")
                outcome.append("accepted")
            except BaseException as exc:
                outcome.append(exc)

        gated.append(threading.Thread(target=produce))
        gated[0].start()
        # The loop ends once the item is queued and its wake-up is held.
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, WAIT)

    _runner_run(main, PausingLoop)
    resume.set()
    join_all(gated)
    assert handed_over == [("discarded", "item"), None]
    assert outcome == ["accepted"]


# -- a function created from another thread as its loop closes -------------------------


def test_function_created_as_its_loop_closes_raises_no_runtime_error(
    loop_factory: LoopFactory,
) -> None:
    """A thread creates a function for a loop that is being shut down and closed
    (asyncio only: a subclass of the asyncio loop holds the thread, and the test closes it).

    It may be refused (ValueError: the loop is closed) or made already closing; it
    must not see RuntimeError. Random interleavings hit this a few times in a
    million creations; here the creating thread is held right after it has checked
    that the loop is open, while the loop shuts down and closes.
    """
    probe = loop_factory()
    base = type(probe)
    probe.close()
    entered = threading.Event()
    resume = threading.Event()
    gated: list[threading.Thread] = []

    class PausingLoop(base):  # type: ignore[valid-type, misc]
        """Holds the gated thread after its first look at is_closed()."""

        def is_closed(self) -> bool:
            closed: bool = super().is_closed()
            if threading.current_thread() in gated and not entered.is_set():
                entered.set()
                resume.wait(WAIT)
            return closed

    outcome: list[object] = []

    def create() -> None:
        try:
            outcome.append(tsfn.ThreadsafeFunction(lambda _: None, loop=loop))
        except Exception as exc:
            outcome.append(exc)

    async def first() -> tsfn.ThreadsafeFunction[None]:
        return tsfn.ThreadsafeFunction(lambda _: None)  # it keeps the loop's port alive

    loop = PausingLoop()
    try:
        keep = loop.run_until_complete(first())
        gated.append(threading.Thread(target=create))
        gated[0].start()
        assert entered.wait(WAIT)
        loop.run_until_complete(loop.shutdown_asyncgens())  # the shutdown hook runs
    finally:
        loop.close()
    resume.set()
    join_all(gated)

    assert keep.closed
    [made] = outcome
    assert not isinstance(made, RuntimeError), repr(made)
    if isinstance(made, tsfn.ThreadsafeFunction):
        assert made.closing
        with pytest.raises(tsfn.Closing):
            made.call(None)
    else:
        assert isinstance(made, (ValueError, tsfn.Closing)), repr(made)


# -- a function still open when the loop ends, fed by one producer ------------------------


class _Streaming:
    """A function fed by a producer that calls until told Closing, with full accounting."""

    def __init__(self) -> None:
        self.delivered: list[int] = []
        self.discarded: list[int] = []
        self.finalized: list[int] = []  # the finalizer's thread id
        self.accepted = 0
        self.some_delivered: anyio.Event | None = None
        self.fn: tsfn.ThreadsafeFunction[int] | None = None
        self.producer: Worker | None = None

    def call_js(self, loop: object, callback: object, context: object, data: int) -> None:
        if loop is None:
            self.discarded.append(data)
            return
        self.delivered.append(data)
        if len(self.delivered) == 10:
            assert self.some_delivered is not None
            self.some_delivered.set()

    def produce(self) -> None:
        assert self.fn is not None
        while True:
            self.fn.call(self.accepted)  # raises Closing at shutdown: the only way out
            self.accepted += 1

    async def start(self) -> None:
        """Create the function and its producer; return once items flow."""
        self.some_delivered = anyio.Event()
        self.fn = tsfn.ThreadsafeFunction(
            call_js=self.call_js,
            max_queue_size=1,
            finalizer=lambda _: self.finalized.append(threading.get_ident()),
        )
        self.producer = start(self.produce, "streaming-producer")
        await self.some_delivered.wait()

    def check_aborted_cleanly(self) -> None:
        assert self.fn is not None
        assert self.producer is not None
        self.producer.finish()
        assert isinstance(self.producer.error, tsfn.Closing), repr(self.producer.error)
        assert "Event loop is closed" not in str(self.producer.error)
        assert self.finalized == [threading.get_ident()]  # once, on the loop's thread
        assert self.fn.closing
        assert self.fn.closed
        # Every accepted call was delivered or discarded, once, in order.
        assert self.delivered + self.discarded == list(range(self.accepted))
        # And the function stays closed for anyone who tries later, from any thread.
        fn = self.fn
        late = start(lambda: fn.call(-1))
        late.finish()
        assert isinstance(late.error, tsfn.Closing)
        assert "Event loop is closed" not in str(late.error)


def test_the_loops_shutdown_aborts_an_open_function(
    run_on_new_loop: Callable[[Main], None],
    tiny_switch_interval: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    streaming = _Streaming()
    run_on_new_loop(streaming.start)
    streaming.check_aborted_cleanly()
    assert "Event loop is closed" not in caplog.text


def test_asyncio_runner_close_aborts_an_open_function_with_a_producer_waiting(
    loop_factory: LoopFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Asyncio only: an asyncio.Runner's loop stands still between its runs."""
    if sys.version_info < (3, 11):
        pytest.skip("asyncio.Runner is new in 3.11")
    streaming = _Streaming()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(streaming.start())
        # Between runs the loop does not turn: the producer fills the queue and waits.
        assert streaming.fn is not None
        fn = streaming.fn
        wait_until(lambda: blocked_callers(fn) == 1)
    streaming.check_aborted_cleanly()
    assert "Event loop is closed" not in caplog.text


@pytest.mark.parametrize(
    "first_on_its_loop",
    [True, False],
    ids=["first-function-of-its-loop", "loop-already-has-a-function"],
)
def test_function_created_by_an_executor_job_during_shutdown_is_still_aborted(
    loop_factory: LoopFactory, first_on_its_loop: bool
) -> None:
    """asyncio.run joins the default executor after closing async generators; a job
    still running then may create a function. It must not outlive the loop open.
    Asyncio only: those are asyncio.run's steps."""
    asyncgens_closed = threading.Event()
    finalized: list[str] = []
    made: list[tsfn.ThreadsafeFunction[int]] = []
    keep: list[object] = []

    async def marker() -> Any:
        try:
            yield
        finally:  # run by loop.shutdown_asyncgens()
            asyncgens_closed.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if not first_on_its_loop:
            other: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
            other.release()
            await other.wait_closed()
        generator = marker()
        await generator.asend(None)
        keep.append(generator)  # alive until shutdown_asyncgens closes it

        def job() -> None:
            assert asyncgens_closed.wait(WAIT)
            made.append(
                tsfn.ThreadsafeFunction(
                    lambda _: None, loop=loop, finalizer=lambda _: finalized.append("late")
                )
            )

        loop.run_in_executor(None, job)  # not awaited: asyncio.run joins it at shutdown

    asyncio_run(main(), loop_factory)
    fn = made[-1]
    assert fn.closed
    assert finalized == ["late"]


# -- a function whose loop was closed directly -------------------------------------------
#
# Asyncio only: a trio run cannot be closed from outside.
# API.md: after a bare loop.close() calls raise `Closing` and blocked callers wake with
# `Closing`; the finalizer cannot run on a closed loop. The same holds whether the loop
# never ran, ran a turn, or was closed with an item still queued.

CLOSED_LOOP_STATES = ["never-ran", "ran-a-turn", "item-queued"]


def _function_on_a_closed_loop(
    loop_factory: LoopFactory, state: str
) -> tsfn.ThreadsafeFunction[int]:
    loop = loop_factory()
    try:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            lambda _: None, loop=loop, max_queue_size=1, initial_thread_count=2
        )
        if state == "ran-a-turn":
            loop.run_until_complete(asyncio.sleep(0))
        elif state == "item-queued":
            fn.call(0)  # the loop never runs: the queue stays full
    finally:
        loop.close()
    return fn


def _queued_before_the_close(state: str) -> int:
    return 1 if state == "item-queued" else 0


@pytest.mark.parametrize("state", CLOSED_LOOP_STATES)
def test_a_function_whose_loop_is_closed_is_closing_and_refuses_new_work(
    loop_factory: LoopFactory, state: str
) -> None:
    fn = _function_on_a_closed_loop(loop_factory, state)
    assert fn.closing
    for attempt in (
        lambda: fn.call(1),
        lambda: fn.call(1, timeout=0.5),
        lambda: fn.call_nowait(1),  # Closing, not QueueFull, even with the queue full
        lambda: fn.submit(1),
        lambda: fn.submit(1, block=False),
        fn.acquire,
    ):
        with pytest.raises(tsfn.Closing, match="loop is closed"):
            attempt()
    assert fn.qsize() == _queued_before_the_close(state)  # the refused calls queued nothing
    assert not fn.closed  # the finalizer cannot run on a closed loop


@pytest.mark.parametrize("state", CLOSED_LOOP_STATES)
def test_release_and_abort_on_a_function_whose_loop_is_closed_raise_nothing_new(
    loop_factory: LoopFactory, state: str
) -> None:
    fn = _function_on_a_closed_loop(loop_factory, state)
    # Releasing and aborting are still allowed and raise nothing (no RuntimeError).
    fn.release()
    fn.abort()
    fn.release()
    with pytest.raises(tsfn.Closing):
        fn.release()  # released more than acquired
    # Nothing can run on a closed loop, so an item queued before the close is neither
    # delivered nor discarded through call_js by the abort: it stays (README's limits).
    assert fn.qsize() == _queued_before_the_close(state)
    assert not fn.closed


def test_loop_close_wakes_callers_blocked_for_room_with_closing(
    loop_factory: LoopFactory,
) -> None:
    loop = loop_factory()
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        lambda _: None, max_queue_size=1, loop=loop
    )
    fn.call(0)  # the loop never runs: the queue stays full
    callers = [start(functools.partial(fn.call, i), f"blocked-{i}") for i in range(1, 4)]
    wait_until(lambda: blocked_callers(fn) == 3)

    loop.close()
    for caller in callers:
        caller.finish()
        assert isinstance(caller.error, tsfn.Closing), repr(caller.error)
    assert not fn.closed  # the finalizer cannot run on a closed loop


# -- calls racing a bare loop.close() --------------------------------------------------------
#
# Asyncio only, as loop.close() is.


@pytest.mark.usefixtures("tiny_switch_interval")
@pytest.mark.parametrize("round_", range(4))
def test_calls_racing_loop_close_raise_closing_never_runtime_error(
    loop_factory: LoopFactory, ledger: Ledger, round_: int
) -> None:
    """Producers call non-stop while the loop is stopped and closed under them."""
    producers = 8
    go = threading.Barrier(producers + 1)
    threads: list[threading.Thread] = []
    loop = loop_factory()

    def hammer(first: int, fn: tsfn.ThreadsafeFunction[int]) -> Callable[[], None]:
        def run() -> None:
            go.wait()
            for n, item in enumerate(range(first, first + 1_000_000)):
                try:
                    if n % 3 == 0:
                        fn.call_nowait(item)
                    elif n % 3 == 1:
                        fn.call(item, timeout=30)
                    else:
                        fn.submit(item)
                except tsfn.QueueFull:
                    continue
                ledger.accept(item)

        return ledger.producer(run)

    async def main() -> None:
        ledger.watch_loop()
        fn = ledger.function(round_, producers)  # unbounded in round 0
        threads.extend(start_threads([hammer(1_000_000 * p, fn) for p in range(producers)]))
        go.wait()
        await until(lambda: len(ledger.accepted) >= 200)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        # The wake-up bound counts from the close: tsfn cannot know of it sooner, and
        # this thread's way from main's end to the close, competing with 8 hammering
        # threads for the GIL every microsecond, took over a second on a loaded machine.
        ledger.main_ended = time.monotonic()
    join_all(threads)
    ledger.check("loop.close", producers)


# -- arming the shutdown hook ------------------------------------------------------------
#
# The first function (or work) of a loop arms tsfn's shutdown hook: on the loop thread,
# it hands the loop's first-iteration hook for async generators (see tsfn/_asyncio.py)
# a stand-in. The tests below wrap that hook, so that something happens exactly while
# the stand-in is being handed over: the window in which c971f67 had swapped in the
# process-wide warning state (`warnings.catch_warnings`) to detect a late hand-over.
# Asyncio only: trio's shutdown needs no such hook (a system task; see tsfn/_trio.py).


@contextlib.contextmanager
def firstiter_also_runs(during: Callable[[], None]) -> Iterator[list[None]]:
    """While inside, the running loop's first-iteration hook runs `during()` right after
    its own work. Yields a list that gets one entry each time the hook runs.

    It is the loop's own method that is wrapped (asyncio's loops and uvloop's): tsfn
    hands its stand-in to that, not to the thread's hook, which others may wrap."""
    loop: Any = asyncio.get_running_loop()
    loop_hook = loop._asyncgen_firstiter_hook
    fired: list[None] = []

    def hook(agen: Any) -> None:
        loop_hook(agen)
        fired.append(None)
        during()

    loop._asyncgen_firstiter_hook = hook  # the instance's, over the class's method
    try:
        yield fired
    finally:
        del loop._asyncgen_firstiter_hook


async def _a_few_loop_turns() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _warn_unclosed() -> None:
    warnings.warn("an unclosed resource was collected", ResourceWarning, stacklevel=1)


@pytest.mark.parametrize("source", ["the loop thread", "another thread"])
def test_a_resource_warning_while_the_hook_is_armed_does_not_abort_the_function(
    loop_factory: LoopFactory, source: str
) -> None:
    """Issue 9, defect 1: a ResourceWarning raised anywhere in the process while a new
    loop's shutdown hook was being armed (garbage collection, another thread, an old
    unclosed loop being freed) made tsfn believe the loop had already shut down, and
    it aborted every function created on that loop."""
    delivered: list[int] = []

    def during() -> None:
        if source == "the loop thread":
            _warn_unclosed()  # as a collected resource does, in whatever code runs
        else:
            warner = threading.Thread(target=_warn_unclosed)
            warner.start()
            join_all([warner])

    async def exercise() -> None:
        with firstiter_also_runs(during) as fired:
            fn = tsfn.ThreadsafeFunction(delivered.append)  # its loop's first: arms
        assert fired, "the hook never ran: rewrite this test"
        await _a_few_loop_turns()  # a shutdown tsfn wrongly scheduled would run here
        assert not fn.closing, "the function was aborted"
        fn.call(1)
        fn.release()
        await fn.wait_closed()
        assert delivered == [1]

    async def main() -> None:
        with pytest.warns(ResourceWarning, match="unclosed resource"):
            await exercise()

    asyncio_run(main(), loop_factory)


def _trace_the_generator(agen: Any) -> None:
    # What a tracing or debugging hook does with the async generators it sees.
    print(f"first iteration of {agen!r}")


def _mark_the_generators_frame(agen: Any) -> None:
    # What trio's hook does in guest mode with a host loop's async generators
    # (trio/_core/_asyncgens.py: agen.ag_frame.f_locals["@trio_foreign_asyncgen"]).
    agen.ag_frame.f_locals["@foreign_asyncgen"] = True


@pytest.mark.parametrize(
    "look", [_trace_the_generator, _mark_the_generators_frame], ids=["repr", "ag_frame"]
)
def test_a_first_iteration_hook_that_looks_at_the_generator_does_not_disturb_the_function(
    loop_factory: LoopFactory, look: Callable[[Any], None]
) -> None:
    """Sibling of issue 9, defect 1: another piece of code wraps the loop's
    first-iteration hook and looks at each async generator before passing it on, as
    tracing tools and trio's guest mode do. Only the loop's own warning about a
    generator started after its shutdown may tell tsfn that the loop has shut down;
    anything else looking at the stand-in must neither abort functions nor break them."""
    delivered: list[int] = []

    async def main() -> None:
        hooks = sys.get_asyncgen_hooks()
        loop_hook = hooks.firstiter
        assert loop_hook is not None

        def hook(agen: Any) -> None:
            look(agen)
            loop_hook(agen)

        sys.set_asyncgen_hooks(firstiter=hook, finalizer=hooks.finalizer)
        try:
            fn = tsfn.ThreadsafeFunction(delivered.append)  # its loop's first: arms
        finally:
            sys.set_asyncgen_hooks(firstiter=loop_hook, finalizer=hooks.finalizer)
        await _a_few_loop_turns()  # a shutdown tsfn wrongly scheduled would run here
        assert not fn.closing, "the function was aborted"
        fn.call(1)
        fn.release()
        await fn.wait_closed()

    asyncio_run(main(), loop_factory)
    assert delivered == [1]


def test_loops_arming_their_hooks_at_once_leave_the_warning_state_alone(
    loop_factory: LoopFactory,
) -> None:
    """Issue 9, defect 2: `warnings.catch_warnings()` is not thread-safe, and loops
    started in several threads at once left `warnings.filters` changed and
    `warnings.showwarning` / `_showwarnmsg_impl` replaced, so that later warnings
    vanished process-wide. tsfn must never touch the global warning state.

    The two loops' hand-overs overlap as badly as they can: the first begins, the
    second begins, the first ends, the second ends."""

    def warning_state() -> tuple[object, ...]:
        return (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl)  # type: ignore[attr-defined]

    before = warning_state()
    first_inside, second_inside, first_done = (
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )
    errors: list[BaseException] = []

    def first_during() -> None:
        first_inside.set()
        assert second_inside.wait(WAIT)

    def second_during() -> None:
        second_inside.set()
        assert first_done.wait(WAIT)

    async def make_a_function(during: Callable[[], None], done: threading.Event) -> None:
        with firstiter_also_runs(during) as fired:
            # Its loop's first function: it arms the hook.
            fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(lambda _: None)
        done.set()
        assert fired, "the hook never ran: rewrite this test"
        fn.release()
        await fn.wait_closed()

    def run_loop(
        during: Callable[[], None], done: threading.Event, after: threading.Event | None
    ) -> None:
        try:
            if after is not None:
                assert after.wait(WAIT)
            asyncio_run(make_a_function(during, done), loop_factory)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run_loop, args=(first_during, first_done, None)),
        threading.Thread(target=run_loop, args=(second_during, threading.Event(), first_inside)),
    ]
    for thread in threads:
        thread.start()
    join_all(threads)
    assert errors == []
    assert warning_state() == before
