"""`stream` and `AsyncWork` on process pools: every in-process guarantee, across processes.

Real pools of each start method this platform offers (spawn, forkserver, and fork
where it is still the default), shared per module; the tests that kill a worker get a
pool of their own. The worker processes tell the test what they saw through a
`multiprocessing.Manager` (its proxies pickle into a job), so that nothing here waits
on a sleep: each wait is for an event or for a count to be reached.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import faulthandler
import itertools
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.managers import SyncManager
from typing import Any

import anyio
import pytest
from _helpers import (
    WAIT,
    read_all,
    remote_threads,
    return_with_a_consumer_running,
    until,
    wait_until,
)
from _loops import asyncio_run

import tsfn
from tsfn import Closing

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

Emit = Callable[[Any], None]

_METHODS: list[Any] = ["spawn", "forkserver"]
if multiprocessing.get_start_method() == "fork":
    # Still the default here: it must work too. From 3.12 on, a process with threads
    # that forks gets a DeprecationWarning (as every asyncio program with a pool does:
    # the loop's default executor, tsfn's own threads); it is the user's to see, not
    # tsfn's doing.
    _METHODS.append(
        pytest.param(
            "fork",
            marks=pytest.mark.filterwarnings(
                r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\):"
                "DeprecationWarning"
            ),
        )
    )


@pytest.fixture(scope="module")
def manager() -> Iterator[SyncManager]:
    with multiprocessing.get_context("spawn").Manager() as manager:
        yield manager


@pytest.fixture(scope="module", params=_METHODS)
def pool(request: pytest.FixtureRequest) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    context = multiprocessing.get_context(request.param)
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        # Started here, not in the first test: its management thread lives as long.
        for _ in concurrent.futures.as_completed([pool.submit(open_fds) for _ in range(2)]):
            pass
        yield pool


# -- functions the worker processes run ----------------------------------------------


def count_to(emit: Emit, n: int) -> str:
    for i in range(n):
        emit(i)
    return f"counted to {n}"


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception does not pickle")


def fail_after(emit: Emit, n: int, exc: BaseException) -> None:
    for i in range(n):
        emit(i)
    raise exc


def fail_unpicklable(emit: Emit) -> None:
    emit(0)
    raise Unpicklable("cannot travel")


def endless(emit: Emit, report: Any) -> None:
    """Emits until told to stop; reports how it was stopped and whether it was told."""
    try:
        for i in itertools.count():
            emit(i)
    except BaseException as exc:
        report.update(stopped_by=type(exc).__name__, cancelled=tsfn.cancelled())
        raise


def endless_counted(emit: Emit, attempted: Any, report: Any) -> None:
    """`endless`, recording before each emit how many items it has tried to emit."""
    attempted.value = 0
    with contextlib.suppress(Closing):
        for i in itertools.count():
            attempted.value = i + 1
            emit(i)
    report.update(stopped_by="Closing", cancelled=tsfn.cancelled())


def compute_until_cancelled(emit: Emit, report: Any) -> None:
    """Emits once, then computes without emitting until tsfn.cancelled() turns True."""
    emit("started")
    deadline = time.monotonic() + WAIT
    while not tsfn.cancelled():
        assert time.monotonic() < deadline, "never cancelled"
    report.update(cancelled=True)
    try:
        emit("after")
    except Closing:
        report.update(closing=True)


def ping_pong(emit: Emit, n: int, acks: Any) -> int:
    """Emits an item, then waits until the consumer has read it, `n` times: each
    item goes in a batch of its own, sent only once it has waited."""
    for i in range(n):
        emit(i)
        assert acks.get(timeout=WAIT) == i
    return n


def counted(emit: Emit, n: int, attempted: Any) -> None:
    """Records, before each emit, how many items it has tried to emit."""
    for i in range(n):
        attempted.value = i + 1
        emit(i)


def progress(emit: Emit, n: int, go: Any) -> None:
    for i in range(n):
        if i == n // 2:
            go.wait(WAIT)  # the consumer stalls here, then reads the newest
        emit(i)


def die(emit: Emit, how: str, arrived: Any) -> None:
    for i in range(3):
        emit(i)
    # Items still buffered in this process die with it: die once all three arrived.
    assert arrived.wait(WAIT), "the items never arrived"
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        faulthandler.disable()  # -X dev enables it: its dump would only add noise
        ctypes.string_at(0)  # reads address 0
    os.kill(os.getpid(), signal.SIGKILL)


def open_fds(_: object = None) -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_open_fds(limit: int) -> int:
    """In a worker: its open fds, once at most `limit` (receiver threads end late)."""
    deadline = time.monotonic() + WAIT
    while open_fds() > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return open_fds()


def wait_for_cancel(data: tuple[Any, Any]) -> None:
    started, report = data
    started.set()
    deadline = time.monotonic() + WAIT
    while not tsfn.cancelled():
        assert time.monotonic() < deadline, "never cancelled"
    report.update(cancelled=True)


def block(gate: Any) -> None:
    gate.wait(WAIT)


def record_run(ran: Any) -> None:
    ran.set()


def notes(exc: BaseException) -> list[str]:
    notes: list[str] = getattr(exc, "__notes__", [])
    return notes


# -- every item, in order, and the outcome ---------------------------------------------


@pytest.mark.parametrize("max_queue_size", [0, 1, 64])
async def test_every_item_arrives_in_order_then_the_result(
    pool: concurrent.futures.Executor, max_queue_size: int
) -> None:
    async with tsfn.stream(count_to, 3000, executor=pool, max_queue_size=max_queue_size) as items:
        got = [item async for item in items]
    assert got == list(range(3000))
    assert items.result == "counted to 3000"


async def test_an_exception_arrives_after_the_items_as_itself_with_the_remote_traceback(
    pool: concurrent.futures.Executor,
) -> None:
    got: list[int] = []
    with pytest.raises(KeyError, match="missing") as raised:
        await read_all(tsfn.stream(fail_after, 5, KeyError("missing"), executor=pool), got)
    assert got == list(range(5))
    (note,) = notes(raised.value)
    assert note.startswith("Remote traceback (process ")
    assert "in fail_after" in note
    assert "KeyError: 'missing'" in note


async def test_an_exception_that_does_not_pickle_arrives_as_a_runtime_error_with_its_text(
    pool: concurrent.futures.Executor,
) -> None:
    got: list[int] = []
    with pytest.raises(RuntimeError, match="Unpicklable: cannot travel") as raised:
        await read_all(tsfn.stream(fail_unpicklable, executor=pool), got)
    assert got == [0]
    assert "in fail_unpicklable" in notes(raised.value)[0]


async def test_an_item_that_does_not_pickle_fails_the_emit_that_was_given_it(
    pool: concurrent.futures.Executor,
) -> None:
    got: list[str] = []
    with pytest.raises(TypeError, match="pickle") as raised:
        await read_all(tsfn.stream(emit_a_lock, executor=pool), got)
    assert got == ["before"]
    assert "emit(threading.Lock())" in notes(raised.value)[0]


def emit_a_lock(emit: Emit) -> None:
    emit("before")
    emit(threading.Lock())


def local_function() -> Callable[[Emit], None]:
    def emit_one(emit: Emit) -> None:  # nested: pickle cannot find it by name
        emit(1)

    return emit_one


async def test_a_function_that_does_not_pickle_fails_the_stream_not_the_loop(
    pool: concurrent.futures.Executor,
) -> None:
    """The pool pickles the job later, in a thread of its own: the error reaches the
    consumer all the same, and nothing waits for a connection that never comes."""
    got: list[int] = []
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        await read_all(tsfn.stream(local_function(), executor=pool), got)
    assert got == []


# -- backpressure ----------------------------------------------------------------------


def reached(counter: Any, value: int) -> Callable[[], bool]:
    return lambda: bool(counter.value >= value)


@pytest.mark.parametrize("max_queue_size", [1, 5, 64])
async def test_the_worker_is_never_more_than_max_queue_size_plus_one_ahead(
    manager: SyncManager, max_queue_size: int
) -> None:
    """As in tests/test_stream.py, counted: the worker records each item it is about to
    emit, and after each read the consumer checks how many it holds in all. At chosen
    points the consumer stalls until the worker is at the bound (within the credits'
    granularity): the bound is the real one (every buffer on both sides and between
    them counts), and it is never passed."""
    bound = max_queue_size + 1
    n = 3 * bound + 20
    attempted = manager.Value("i", 0)
    consumed = 0
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("forkserver")
    ) as pool:
        async with tsfn.stream(
            counted, n, attempted, executor=pool, max_queue_size=max_queue_size
        ) as items:
            async for item in items:
                assert item == consumed
                consumed += 1
                assert attempted.value - consumed <= bound
                if consumed in (1, n // 2):
                    # Credits return in quarters of the queue (see _relay.py): the
                    # worker gets that close to the bound while the consumer stalls.
                    near = consumed + bound - (max(1, max_queue_size // 4) - 1)
                    await anyio.to_thread.run_sync(wait_until, reached(attempted, near))
    assert consumed == n


async def test_an_item_the_worker_waits_on_is_sent_while_it_waits(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    acks = manager.Queue()
    got: list[int] = []
    async with tsfn.stream(ping_pong, 5, acks, executor=pool) as items:
        async for item in items:
            got.append(item)
            await anyio.to_thread.run_sync(acks.put, item)
    assert got == [0, 1, 2, 3, 4]
    assert items.result == 5


async def test_latest_skips_to_the_newest_item_and_always_delivers_the_last(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    go = manager.Event()
    got: list[int] = []
    async with tsfn.stream(progress, 2000, go, executor=pool, latest=True) as items:
        async for item in items:
            got.append(item)
            if not go.is_set() and item >= 0:
                go.set()
    assert got == sorted(set(got))
    assert got[-1] == 1999
    assert len(got) < 2000


# -- cancellation ----------------------------------------------------------------------


async def test_leaving_early_makes_the_remote_emit_raise_closing_and_cancelled_true(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    report = manager.dict()
    async with tsfn.stream(endless, report, executor=pool, max_queue_size=4) as items:
        async for item in items:
            if item == 10:
                break
    # The block returned only after the remote function had: its report is complete.
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}


async def test_cancelled_turns_true_in_a_worker_that_computes_without_emitting(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    report = manager.dict()
    async with tsfn.stream(compute_until_cancelled, report, executor=pool) as items:
        async for item in items:
            assert item == "started"
            break
    assert dict(report) == {"cancelled": True, "closing": True}


async def test_cancelling_the_consumer_task_stops_the_remote_worker_first(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    report = manager.dict()
    first = anyio.Event()
    consumer = anyio.CancelScope()

    async def consume() -> None:
        with consumer:
            async with tsfn.stream(endless, report, executor=pool, max_queue_size=4) as items:
                async for _ in items:
                    first.set()

    async with anyio.create_task_group() as group:
        group.start_soon(consume)
        with anyio.fail_after(WAIT):
            await first.wait()
        consumer.cancel()
    assert consumer.cancelled_caught
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}


def test_loop_shutdown_with_a_remote_stream_running_tells_the_worker(
    manager: SyncManager,
) -> None:
    """asyncio: a consumer task left running when main returns is cancelled by the
    loop's shutdown (trio has no such task: its nurseries wait)."""
    report = manager.dict()
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return_with_a_consumer_running(tsfn.stream(endless, report, executor=pool))
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}


def test_a_loop_closed_under_a_remote_stream_tells_the_worker(manager: SyncManager) -> None:
    """A bare loop.close() runs no shutdown and strands the consumer: the relay finds
    the loop closed, tells the worker, and reads its channel to the end (the pool's
    shutdown would hang otherwise, and the test's timeout fail it)."""
    report = manager.dict()
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        loop = asyncio.new_event_loop()

        async def start() -> asyncio.Task[None]:
            first = asyncio.Event()

            async def consume() -> None:
                async with tsfn.stream(endless, report, executor=pool) as items:
                    async for _ in items:
                        first.set()

            task = asyncio.ensure_future(consume())
            await asyncio.wait_for(first.wait(), WAIT)
            return task

        task = loop.run_until_complete(start())
        loop.close()
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}
    assert not task.done()  # stranded, as a bare close leaves every task


@pytest.mark.parametrize("watching", [True, False], ids=["loop reads", "relay reads"])
def test_a_loop_closed_after_reading_all_that_came_tells_the_worker_waiting_for_credits(
    manager: SyncManager, watching: bool
) -> None:
    """Closed with nothing left in flight: the worker waits for credits, the relay for
    frames, and neither would ever come; the relay finds the loop closed and tells."""
    report = manager.dict()
    attempted = manager.Value("i", -1)
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        loop = asyncio.new_event_loop() if watching else NoSocketWatching()

        async def start() -> None:
            items = await tsfn.stream(
                endless_counted, attempted, report, max_queue_size=1, executor=pool
            ).__aenter__()
            # One credit: item 0 is sent, and the worker waits in the emit of item 1.
            await anyio.to_thread.run_sync(wait_until, reached(attempted, 2))
            # White-box: the loop has read item 0, all there is to read.
            buffer = items._items._buffer  # type: ignore[union-attr]
            await until(lambda: bool(buffer))

        loop.run_until_complete(start())
        loop.close()
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}
    assert attempted.value == 2


class NoSocketWatching(asyncio.SelectorEventLoop):
    """A loop that watches no sockets, as asyncio's proactor loop (Windows)."""

    def add_reader(self, *args: Any) -> None:  # type: ignore[override]  # refuses any
        raise NotImplementedError


@pytest.mark.parametrize("max_queue_size", [0, 1, 64])
def test_on_a_loop_that_watches_no_sockets_the_relay_delivers_every_item(
    max_queue_size: int, pool: concurrent.futures.Executor
) -> None:
    async def main() -> tuple[list[int], str]:
        async with tsfn.stream(
            count_to, 300, max_queue_size=max_queue_size, executor=pool
        ) as items:
            got = [item async for item in items]
        return got, items.result

    got, result = asyncio_run(main(), loop_factory=NoSocketWatching)
    assert got == list(range(300))
    assert result == "counted to 300"


def test_on_a_loop_that_watches_no_sockets_leaving_early_stops_the_worker(
    manager: SyncManager, pool: concurrent.futures.Executor
) -> None:
    report = manager.dict()

    async def main() -> None:
        async with tsfn.stream(endless, report, executor=pool) as items:
            async for _ in items:
                break

    asyncio_run(main(), loop_factory=NoSocketWatching)
    assert dict(report) == {"stopped_by": "Closing", "cancelled": True}


# -- faults ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        "exit",
        "segfault",
        pytest.param(
            "kill", marks=pytest.mark.skipif(sys.platform == "win32", reason="no SIGKILL")
        ),
    ],
)
async def test_a_dead_worker_ends_the_stream_with_broken_process_pool_after_its_items(
    how: str, manager: SyncManager
) -> None:
    got: list[int] = []
    arrived = manager.Event()
    context = multiprocessing.get_context("forkserver")
    with (
        concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool,
        pytest.raises(concurrent.futures.process.BrokenProcessPool),
    ):
        await read_all(tsfn.stream(die, how, arrived, executor=pool), got, arrived.set)
    assert got == [0, 1, 2]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc/self/fd")
async def test_many_streams_leak_no_fd_thread_or_process(manager: SyncManager) -> None:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        # Both workers first: the pool starts processes on demand, and one started
        # during the streams would count as two fds (its pipes) and a process more.
        both = manager.Barrier(2)
        for job in [pool.submit(both.wait, WAIT) for _ in range(2)]:
            job.result()
        async with tsfn.stream(count_to, 10, executor=pool) as items:
            async for _ in items:
                pass  # the pool's processes and pipes exist from here on
        wait_until(lambda: not remote_threads())
        before = open_fds()
        worker_before = max(pool.submit(open_fds).result() for _ in range(4))
        children = multiprocessing.active_children()
        for _ in range(40):
            async with tsfn.stream(count_to, 100, executor=pool) as items:
                async for _ in items:
                    pass
        async with tsfn.stream(count_to, 10**9, executor=pool) as items:
            async for _ in items:
                break  # and one left early
        wait_until(lambda: not remote_threads())
        assert open_fds() <= before  # fewer is fine: a hub's listener may have closed
        worker_after = max(pool.submit(wait_open_fds, worker_before).result() for _ in range(4))
        assert worker_after <= worker_before
        assert multiprocessing.active_children() == children


# -- AsyncWork -------------------------------------------------------------------------


async def test_cancelled_turns_true_in_a_work_running_in_a_worker_process(
    pool: concurrent.futures.Executor, manager: SyncManager
) -> None:
    started, report = manager.Event(), manager.dict()
    completed = anyio.Event()
    work = tsfn.AsyncWork(
        wait_for_cancel,
        lambda status, _: completed.set(),
        data=(started, report),
        executor=pool,
    )
    awaiter = anyio.CancelScope()

    async def await_work() -> None:
        with awaiter:
            await work

    async with anyio.create_task_group() as group:
        group.start_soon(await_work)
        await anyio.to_thread.run_sync(started.wait, WAIT)
        assert not work.cancel()  # it runs: too late to take it back
        awaiter.cancel()
    assert awaiter.cancelled_caught
    with anyio.fail_after(WAIT):
        await completed.wait()
    assert work.status is tsfn.Status.OK
    assert dict(report) == {"cancelled": True}


async def test_a_work_cancelled_before_it_starts_never_runs(manager: SyncManager) -> None:
    gate, ran = manager.Event(), manager.Event()
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        # The pool hands max_workers + 1 jobs to its processes' queue at once; those
        # count as started. The work comes after them.
        busy = [pool.submit(block, gate) for _ in range(2)]
        work = tsfn.AsyncWork(record_run, data=ran, executor=pool).queue()
        assert work.cancel()
        assert not work.cancel()
        gate.set()
        for job in busy:
            job.result(WAIT)
        with pytest.raises(asyncio.CancelledError):
            await work
        assert work.status is tsfn.Status.CANCELLED
        pool.submit(block, gate).result(WAIT)  # every job before it has run
    assert not ran.is_set()


async def test_a_work_returns_its_value_through_the_pool(pool: concurrent.futures.Executor) -> None:
    assert await tsfn.AsyncWork(open_fds, executor=pool) > 0


def test_tsfn_imports_and_streams_through_a_pool_without_dask() -> None:
    program = (
        "import sys; sys.modules['distributed'] = sys.modules['dask'] = None\n"
        "import asyncio, concurrent.futures, multiprocessing, tsfn\n"
        "from test_process import count_to\n"
        "async def main(pool):\n"
        "    async with tsfn.stream(count_to, 3, executor=pool) as items:\n"
        "        print([i async for i in items])\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('forkserver')\n"
        "    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:\n"
        "        asyncio.run(main(pool))\n"
    )
    here = os.path.dirname(__file__)
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([here, *sys.path])},
    )
    assert (done.returncode, done.stdout) == (0, "[0, 1, 2]\n"), done.stderr


# -- loky: not a concurrent.futures.ProcessPoolExecutor --------------------------------------
#
# loky's executor pickles its jobs (with cloudpickle) to run them in other processes, but
# it is not a ProcessPoolExecutor, and tsfn does not special-case it. An AsyncWork needs
# nothing from tsfn across the boundary (its outcome comes back through loky's future); a
# stream's in-process worker would emit into a copy of the stream, so it refuses.


@pytest.fixture(scope="module")
def loky_pool() -> Iterator[concurrent.futures.Executor]:
    loky = pytest.importorskip("loky", reason="loky is not installed")
    pool = loky.ProcessPoolExecutor(max_workers=1)
    try:
        pool.submit(open_fds).result(WAIT)  # its manager thread lives as long as the pool
        yield pool
    finally:
        pool.shutdown()


async def test_a_work_runs_on_loky_and_returns_through_its_future(
    loky_pool: concurrent.futures.Executor,
) -> None:
    pid = await tsfn.AsyncWork(lambda _: os.getpid(), executor=loky_pool)
    assert pid != os.getpid()


async def test_a_stream_on_loky_fails_with_an_error_that_names_what_works(
    loky_pool: concurrent.futures.Executor,
) -> None:
    async with tsfn.stream(count_to, 3, executor=loky_pool) as items:
        with pytest.raises(pickle.PicklingError) as caught:  # loky's, from ours
            await items.__anext__()
    # Its cause is the text of tsfn's TypeError, as loky formats an error it caught.
    assert "ProcessPoolExecutor or a Dask" in str(caught.value.__cause__)
