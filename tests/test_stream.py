"""tsfn.stream: node-addon-api's AsyncProgressQueueWorker (every item, with
backpressure) and, with ``latest=True``, its AsyncProgressWorker (newest item only).

Ported cases: Q1 (every emitted item reaches the consumer, in order, before the end),
Q2 and P2 (a failing worker: the consumer gets the error), P3 (a worker emitting far
faster than the consumer reads, in latest mode). Backpressure is measured by
counting, never by timing: the worker and the consumer share two counters under a
lock, and the worker records how far ahead it got each time an emit returned.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from _helpers import WAIT, set_from_worker, until

import tsfn
from tsfn import Closing

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

Emit = Callable[[int], None]


class EndlessWorker:
    """A worker that emits forever and records how it was stopped.

    `done` is set in its `finally`, so a test can check that the `async with` block
    did not exit before the worker returned.
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self.stopped_by: BaseException | None = None
        self.cancelled_at_stop: bool | None = None

    def __call__(self, emit: Emit) -> None:
        try:
            for i in itertools.count():
                emit(i)
        except BaseException as exc:
            self.stopped_by = exc
            self.cancelled_at_stop = tsfn.cancelled()
            raise
        finally:
            self.done.set()


# -- every item, in order ------------------------------------------------------------


@pytest.mark.parametrize("max_queue_size", [0, 1, 64])
async def test_Q1_every_item_arrives_in_order_then_the_result(max_queue_size: int) -> None:
    def worker(emit: Emit, n: int, tag: str) -> str:
        for i in range(n):
            emit(i)
        return f"{tag}: {n} emitted"

    got: list[int] = []
    async with tsfn.stream(worker, 2000, "w", max_queue_size=max_queue_size) as items:
        async for item in items:
            got.append(item)
    assert got == list(range(2000))
    assert items.result == "w: 2000 emitted"


async def test_result_is_not_available_before_the_iteration_ends() -> None:
    def worker(emit: Emit) -> int:
        emit(1)
        return 99

    async with tsfn.stream(worker) as items:
        with pytest.raises(RuntimeError):
            _ = items.result
        assert [item async for item in items] == [1]
        assert items.result == 99


async def test_the_worker_runs_on_the_executor_given() -> None:
    def worker(emit: Callable[[str], None]) -> str:
        emit(threading.current_thread().name)
        return threading.current_thread().name

    with concurrent.futures.ThreadPoolExecutor(thread_name_prefix="stream-pool") as pool:
        async with tsfn.stream(worker, executor=pool) as items:
            names = [name async for name in items]
    assert len(names) == 1
    assert names[0].startswith("stream-pool")
    assert items.result == names[0]


async def test_a_job_the_executor_cancels_before_it_runs_ends_the_stream() -> None:
    """A pool shut down with cancel_futures=True drops the stream's queued job: the
    consumer gets the executor's CancelledError instead of waiting for ever."""
    busy = threading.Event()
    free = threading.Event()

    def occupy() -> None:
        busy.set()
        free.wait(WAIT)

    def worker(emit: Emit) -> None:
        emit(1)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(occupy)
        assert await anyio.to_thread.run_sync(busy.wait, WAIT)
        async with tsfn.stream(worker, executor=pool) as items:
            pool.shutdown(wait=False, cancel_futures=True)
            with pytest.raises(concurrent.futures.CancelledError):
                await items.__anext__()
    finally:
        free.set()
        pool.shutdown()


class PicklingExecutor(concurrent.futures.ThreadPoolExecutor):
    """Sends each job as a process pool would: pickled, then run from the copy, and a
    job that does not pickle fails its future (as loky's feeder thread does)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        def sent() -> object:
            copy = pickle.loads(pickle.dumps((fn, args, kwargs)))
            return copy[0](*copy[1], **copy[2])

        return super().submit(sent)


async def test_an_executor_that_pickles_its_jobs_is_refused_with_a_clear_error() -> None:
    """A stream's in-process worker sent to another process would emit into a copy of
    the stream: the consumer would wait for ever. It refuses to be pickled, naming the
    executors that do cross processes."""
    ran: list[None] = []

    def worker(emit: Emit) -> None:
        ran.append(None)
        emit(1)

    with PicklingExecutor() as pool:
        async with tsfn.stream(worker, executor=pool) as items:
            with pytest.raises(TypeError, match="ProcessPoolExecutor or a Dask"):
                await items.__anext__()
    assert ran == []


def emits_nothing(emit: Emit) -> None:
    pass


async def test_bad_max_queue_size_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_queue_size"):
        tsfn.stream(emits_nothing, max_queue_size=-1)


# -- backpressure ----------------------------------------------------------------------


@pytest.mark.parametrize("max_queue_size", [1, 2, 5, 64])
async def test_the_worker_is_never_more_than_max_queue_size_plus_one_ahead(
    max_queue_size: int,
) -> None:
    """Counted, not timed. An item is "ahead" from the moment the worker holds it (just
    before `emit`) until `__anext__` takes it for the consumer, so the count covers
    every buffer between them plus the item in the worker's hand. The bound holds at
    every step, and a stalled consumer lets the worker reach it exactly: the bound is
    the real one, not merely a looser one that happens to hold.

    The consumer checks the bound right after each read, counting that read, and
    while it stalls it waits for the worker to get exactly as far ahead as it may: the
    consumer's own count does not move then, so that wait is exact even where the
    worker runs in parallel (free-threaded CPython). (The worker itself once recorded
    reaching the bound, against a count that lagged by the item `__anext__` was
    returning: without the GIL it could miss the moment.)"""
    bound = max_queue_size + 1
    n = 3 * bound + 50
    pauses = {0, n // 3, n - bound}  # consumed counts at which the consumer stalls
    lock = threading.Lock()
    produced = consumed = 0

    def at_the_bound() -> bool:
        with lock:
            return produced - consumed == bound

    def worker(emit: Emit) -> None:
        nonlocal produced
        for i in range(n):
            with lock:
                produced += 1
            emit(i)  # must block here until the consumer reads: every slot is taken

    got: list[int] = []
    async with tsfn.stream(worker, max_queue_size=max_queue_size) as items:
        while True:
            if consumed in pauses:
                # Stall until the worker is as far ahead as it may get. A timeout here
                # means it never got there: the stream holds back more than it must.
                await until(at_the_bound)
            try:
                item = await items.__anext__()
            except StopAsyncIteration:
                break
            got.append(item)
            with lock:
                consumed += 1
                assert produced - consumed <= bound
    assert got == list(range(n))


# -- errors ----------------------------------------------------------------------------


class WorkerError(Exception):
    pass


@pytest.mark.parametrize("max_queue_size", [1, 64])
async def test_Q2_items_before_an_exception_arrive_first_then_the_exception(
    max_queue_size: int,
) -> None:
    boom = WorkerError("worker failed")
    raised = anyio.Event()
    signal_raised = set_from_worker(raised)

    def worker(emit: Emit) -> None:
        for i in range(5):
            emit(i)
        signal_raised()
        raise boom

    got: list[int] = []

    async def consume() -> None:
        async with tsfn.stream(worker, max_queue_size=max_queue_size) as items:
            if max_queue_size > 5:
                # Read only after the worker raised: the items are all still queued.
                await raised.wait()
            async for item in items:
                got.append(item)

    with pytest.raises(WorkerError) as caught:
        await consume()
    assert caught.value is boom
    assert got == [0, 1, 2, 3, 4]


async def test_P2_an_exception_before_any_item_reaches_the_consumer() -> None:
    def worker(emit: Emit) -> None:
        raise WorkerError("no items")

    async with tsfn.stream(worker) as items:
        with pytest.raises(WorkerError, match="no items"):
            await items.__anext__()


async def test_an_exception_is_not_lost_when_the_consumer_never_iterates() -> None:
    finished = anyio.Event()
    signal_finished = set_from_worker(finished)

    def worker(emit: Emit) -> None:
        signal_finished()
        raise WorkerError("unseen")

    with pytest.raises(WorkerError, match="unseen"):
        async with tsfn.stream(worker):
            await finished.wait()


@pytest.mark.parametrize("latest", [False, True], ids=["every item", "latest"])
@pytest.mark.parametrize("stop", [StopAsyncIteration, StopIteration])
async def test_a_function_raising_a_stop_exception_fails_the_iteration(
    stop: type[Exception], latest: bool
) -> None:
    """Issue 9, defect 12: a stream function raising StopAsyncIteration was swallowed:
    re-raised from `__anext__`, it just ended the consumer's `async for`, and
    `items.result` then raised a confusing error. Like any other exception it reaches
    the consumer after the items emitted before it, as a RuntimeError caused by it
    (PEP 479 does the same for generators). StopIteration, which a coroutine cannot
    raise either, goes the same way."""
    error = stop("the worker ran out")

    def worker(emit: Emit) -> None:
        emit(0)
        emit(1)
        raise error

    got: list[int] = []

    async def consume(items: tsfn.Stream[int, None]) -> None:
        async for item in items:
            got.append(item)

    async with tsfn.stream(worker, latest=latest) as items:
        with pytest.raises(RuntimeError) as caught:
            await consume(items)
    assert caught.value.__cause__ is error
    # latest: 0 may be overwritten before it is read, but the last item always arrives.
    assert got in ([0, 1], [1]) if latest else got == [0, 1]
    with pytest.raises(RuntimeError, match="once the iteration has ended"):
        _ = items.result  # there is no result: the function raised


# -- leaving early ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_queue_size", "latest"), [(1, False), (64, False), (0, False), (0, True)]
)
async def test_break_makes_the_next_emit_raise_closing_and_waits_for_the_worker(
    max_queue_size: int, latest: bool
) -> None:
    worker = EndlessWorker()
    got: list[int] = []
    async with tsfn.stream(worker, max_queue_size=max_queue_size, latest=latest) as items:
        async for item in items:
            got.append(item)
            if len(got) == 3:
                break
    # The block exits only after the worker has returned.
    assert worker.done.is_set()
    assert isinstance(worker.stopped_by, Closing)
    assert worker.cancelled_at_stop is True
    assert len(got) == 3
    if not latest:
        assert got == [0, 1, 2]


async def test_leaving_without_reading_stops_a_blocked_worker() -> None:
    worker = EndlessWorker()
    started = anyio.Event()
    signal_started = set_from_worker(started)

    def fill_then_forever(emit: Emit) -> None:
        emit(-1)  # takes the only slot: nobody reads it, so the next emit must wait
        signal_started()
        worker(emit)

    async with tsfn.stream(fill_then_forever, max_queue_size=1):
        await started.wait()
    assert worker.done.is_set()
    assert isinstance(worker.stopped_by, Closing)


async def test_an_error_in_the_body_propagates_and_still_waits_for_the_worker() -> None:
    worker = EndlessWorker()

    async def consume() -> None:
        async with tsfn.stream(worker, max_queue_size=1) as items:
            async for _ in items:
                raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        await consume()
    assert worker.done.is_set()
    assert isinstance(worker.stopped_by, Closing)


@pytest.mark.parametrize("where", ["in the body", "waiting for an item"])
async def test_cancelling_the_consumer_task_stops_the_worker_before_the_block_exits(
    where: str,
) -> None:
    worker = EndlessWorker()
    reading = anyio.Event()
    release_items = threading.Event()
    done_when_block_exited: list[bool] = []

    def gated(emit: Emit) -> None:
        # Emit three items, then (for "waiting for an item") make the consumer wait.
        for i in range(3):
            emit(i)
        if where == "waiting for an item":
            release_items.wait()
        worker(emit)

    async def consume() -> None:
        try:
            async with tsfn.stream(gated, max_queue_size=1) as items:
                got = 0
                async for _ in items:
                    got += 1
                    if got == 3:
                        reading.set()
                        if where == "in the body":
                            await anyio.sleep_forever()  # parked here until cancelled
        finally:
            done_when_block_exited.append(worker.done.is_set())

    async with anyio.create_task_group() as tasks:
        scope = anyio.CancelScope()

        async def consumer() -> None:
            with scope:
                await consume()

        tasks.start_soon(consumer)
        # reading is set in the same step in which the task then suspends: in the body,
        # or in its next `async for` wait (the worker holds item 4 back).
        await reading.wait()
        scope.cancel()
        release_items.set()
    assert scope.cancelled_caught, "the cancellation did not come out of the block"
    assert done_when_block_exited == [True]
    assert isinstance(worker.stopped_by, Closing)
    assert worker.cancelled_at_stop is True


async def test_cancelled_turns_true_in_a_worker_once_the_consumer_has_gone() -> None:
    # A worker between emits (long computation) learns it can stop by polling.
    seen: list[bool] = []
    done = threading.Event()

    def worker(emit: Emit) -> str:
        try:
            emit(0)
            seen.append(tsfn.cancelled())
            while not tsfn.cancelled():
                time.sleep(0.001)  # simulated work between polls; any length is correct
            seen.append(tsfn.cancelled())
            with pytest.raises(Closing):
                emit(1)
            return "stopped"
        finally:
            done.set()

    async with tsfn.stream(worker) as items:
        async for _ in items:
            break
    assert done.is_set()
    assert seen[-1] is True
    assert tsfn.cancelled() is False  # the flag belongs to the worker only


# -- latest=True (AsyncProgressWorker) ------------------------------------------------


async def test_P3_latest_emit_never_blocks_even_if_the_consumer_never_reads() -> None:
    n = 100_000
    finished = anyio.Event()
    signal_finished = set_from_worker(finished)

    def worker(emit: Emit) -> int:
        for i in range(n):
            emit(i)
        signal_finished()
        return n

    async with tsfn.stream(worker, latest=True) as items:
        await finished.wait()  # the worker ran to the end without a single read
        got = [item async for item in items]
    # Nothing was read before the end, so the newest item is the only one.
    assert got == [n - 1]
    assert items.result == n


async def test_latest_delivers_the_newest_item_since_the_last_read() -> None:
    first_ten, second_ten = anyio.Event(), anyio.Event()
    signal_first_ten, signal_second_ten = set_from_worker(first_ten), set_from_worker(second_ten)
    go_on = threading.Event()

    def worker(emit: Emit) -> None:
        for i in range(10):
            emit(i)
        signal_first_ten()
        go_on.wait()
        for i in range(10, 20):
            emit(i)
        signal_second_ten()

    got: list[int] = []
    async with tsfn.stream(worker, latest=True) as items:
        await first_ten.wait()
        got.append(await items.__anext__())
        go_on.set()
        await second_ten.wait()
        got.extend([item async for item in items])
    assert got == [9, 19]


@pytest.mark.usefixtures("tiny_switch_interval")
async def test_latest_is_a_strictly_increasing_subsequence_ending_with_the_last_item() -> None:
    for n in (1, 2, 500, 5000):

        def worker(emit: Emit, n: int = n) -> None:
            for i in range(n):
                emit(i)

        async with tsfn.stream(worker, latest=True) as items:
            got = [item async for item in items]
        assert got, n
        assert all(a < b for a, b in itertools.pairwise(got)), n
        assert got[-1] == n - 1
        assert set(got) <= set(range(n))


async def test_latest_delivers_the_last_item_before_an_exception() -> None:
    raised = anyio.Event()
    signal_raised = set_from_worker(raised)

    def worker(emit: Emit) -> None:
        for i in range(10):
            emit(i)
        signal_raised()
        raise WorkerError("after ten")

    got: list[int] = []

    async def consume() -> None:
        async with tsfn.stream(worker, latest=True) as items:
            await raised.wait()
            async for item in items:
                got.append(item)

    with pytest.raises(WorkerError):
        await consume()
    assert got == [9]
