"""Memory: what tsfn lets go of, and what stays flat under millions of items.

Two kinds of tests live here:

- Fast ones, in the normal suite: a closed ThreadsafeFunction, a completed AsyncWork
  and a finished stream are freed once the user drops them (checked with `weakref`
  after `gc.collect()`), and so is the event loop they ran on.
- Soak ones, marked `soak` and run only by ``python3 dev.py soak`` (``pytest -m soak
  --timeout=600``), 2-5 minutes in all: millions of items through bounded functions
  and streams, and thousands of functions, works and loops created and closed. After
  a warm-up, the process's RSS and the number of objects the garbage collector
  tracks must stay flat. Each soak test runs for a fixed time, not a fixed count, so
  a slow machine does less work rather than take longer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import psutil
import pytest
from _helpers import Backend, run_on
from _loops import LoopFactory

import tsfn
from tsfn._running import running_port

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


# -- fast: dropped objects are freed -------------------------------------------------------


def _dead(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


async def _freed(ref: weakref.ref[Any]) -> bool:
    """Whether `ref` dies within a few seconds, given the loop time to settle.

    Not immediately: a cancelled AsyncWork's job stays in the default executor's
    queue (holding the work) until a worker picks it up and skips it.
    """
    for _ in range(500):
        if _dead(ref):
            return True
        await anyio.sleep(0.01)
    return False


@pytest.mark.timeout(20)
@pytest.mark.parametrize("ending", ["released", "aborted", "with_submit_and_tasks"])
async def test_closed_function_is_freed_once_dropped(ending: str) -> None:
    delivered: list[int] = []

    async def later(item: int) -> int:
        await anyio.lowlevel.checkpoint()
        return item

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        (lambda item: later(item)) if ending == "with_submit_and_tasks" else delivered.append,
        call_js=None if ending != "aborted" else (lambda *args: None),
        max_queue_size=8,
        finalizer=lambda _: None,
    )
    futures: list[concurrent.futures.Future[Any]] = []

    def produce(fn: tsfn.ThreadsafeFunction[int]) -> None:
        for i in range(100):
            if ending == "with_submit_and_tasks" and i % 10 == 0:
                futures.append(fn.submit(i))
            else:
                fn.call(i)

    producer = threading.Thread(target=produce, args=(fn,))
    producer.start()
    await anyio.to_thread.run_sync(producer.join)
    if ending == "aborted":
        fn.abort()
    else:
        fn.release()
    await fn.wait_closed()
    assert all(f.done() for f in futures)

    ref = weakref.ref(fn)
    del fn, producer
    # Not even a reference cycle: plain reference counting frees it.
    assert ref() is None, "a closed ThreadsafeFunction outlives its last user reference"


@pytest.mark.timeout(20)
async def test_completed_async_work_is_freed_once_dropped() -> None:
    completions: list[tsfn.Status] = []
    work = tsfn.AsyncWork(lambda n: n * 2, lambda status, _: completions.append(status), data=21)
    assert await work == 42
    # Cancelled while it waits for a worker: the executor's only worker is busy.
    executor = concurrent.futures.ThreadPoolExecutor(1)
    busy = threading.Event()
    executor.submit(busy.wait)
    cancelled: tsfn.AsyncWork[int, int] = tsfn.AsyncWork(lambda n: n, executor=executor)
    cancelled.queue()
    assert cancelled.cancel()
    busy.set()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    executor.shutdown()

    refs = [weakref.ref(work), weakref.ref(cancelled)]
    del work, cancelled
    assert [await _freed(ref) for ref in refs] == [True, True]
    assert completions == [tsfn.Status.OK]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", ["to_the_end", "left_early", "latest"])
async def test_finished_stream_is_freed_once_dropped(how: str) -> None:
    def count(emit: Callable[[int], None], n: int) -> int:
        for i in range(n):
            emit(i)
        return n

    async with tsfn.stream(count, 50, max_queue_size=4, latest=how == "latest") as items:
        async for item in items:
            if how == "left_early" and item == 10:
                break

    # The stream and its function refer to each other (a cycle the collector frees);
    # nothing else may hold on to them.
    ref = weakref.ref(items)
    del items
    assert await _freed(ref)


@pytest.mark.timeout(20)
def test_loop_a_function_ran_on_is_freed_after_it_closes(anyio_backend: Backend) -> None:
    refs: list[weakref.ref[Any]] = []

    async def main() -> None:
        # What stands for the loop: the asyncio loop, or the trio run's token.
        refs.append(weakref.ref(running_port("test").token))
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
        fn.call(1)
        fn.release()
        await fn.wait_closed()
        assert await tsfn.AsyncWork(lambda _: "done") == "done"

    run_on(anyio_backend, main)
    assert _dead(refs[0]), "the loop is still alive after tsfn.run returned"


async def _open_function_with_an_item() -> tsfn.ThreadsafeFunction[int]:
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    fn.call(1)  # still queued when the loop is closed under it
    return fn


@pytest.mark.timeout(20)
def test_functions_on_loops_closed_directly_do_not_pile_up(loop_factory: LoopFactory) -> None:
    """A bare loop.close() strands what was queued (API.md), but must not also keep
    every such function, its loop and its items alive for the rest of the process."""
    refs: list[weakref.ref[Any]] = []
    for _ in range(20):
        loop = loop_factory()
        fn = loop.run_until_complete(_open_function_with_an_item())
        loop.close()
        refs += [weakref.ref(fn), weakref.ref(loop)]
        del fn, loop

    async def use_tsfn_normally() -> None:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
        fn.release()
        await fn.wait_closed()

    # Then the program goes on using tsfn (which may be when it notices the closed loops).
    tsfn.run(use_tsfn_normally(), loop_factory=loop_factory)
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive == 0, f"{alive} of {len(refs)} functions and loops are still alive"


# -- soak: millions of items, flat memory ------------------------------------------------


class Gauge:
    """RSS and live (gc-tracked) objects, sampled after a full collection."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.samples: list[tuple[int, int]] = []

    def sample(self) -> None:
        gc.collect()
        self.samples.append((self.process.memory_info().rss, len(gc.get_objects())))

    def assert_flat(
        self, *, warmup: int = 2, rss_slack: int = 24 * MB, objects_slack: int = 5000
    ) -> None:
        """After `warmup` samples, neither RSS nor the object count may keep growing.

        The slack covers allocator noise (arenas kept for reuse, a gc generation's
        worth of garbage); a per-item leak over millions of items is far above it.
        """
        assert len(self.samples) > warmup + 2, f"too few rounds to judge: {self.samples}"
        base_rss, base_objects = self.samples[warmup]
        peak_rss = max(rss for rss, _ in self.samples[warmup:])
        peak_objects = max(objects for _, objects in self.samples[warmup:])
        assert peak_rss - base_rss < rss_slack, f"RSS grew: {self.samples}"
        assert peak_objects - base_objects < objects_slack, f"objects grew: {self.samples}"


def _push_round(fn: tsfn.ThreadsafeFunction[int], producers: int, items: int) -> int:
    """`producers` threads send `items` items each with a mix of calls; return the sum."""
    sums = [0] * producers

    def produce(p: int) -> None:
        rng = random.Random(p)
        futures: list[concurrent.futures.Future[Any]] = []
        with fn.acquire():
            for i in range(items):
                value = p * items + i
                how = rng.random()
                if how < 0.6:
                    fn.call(value)
                elif how < 0.95:
                    while True:
                        try:
                            fn.call_nowait(value)
                            break
                        except tsfn.QueueFull:
                            time.sleep(0)
                else:
                    futures.append(fn.submit(value))
                sums[p] += value
                if len(futures) > 100:  # keep what a producer holds bounded
                    futures = [f for f in futures if not f.done()]
            for future in futures:
                future.result()

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(sums)


@pytest.mark.soak
def test_soak_millions_of_items_through_bounded_functions_keep_memory_flat(
    anyio_backend: Backend,
) -> None:
    gauge = Gauge()
    seconds = 30

    async def main() -> None:
        total = [0]
        sent = delivered = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or len(gauge.samples) < 6:
            # One long-lived function per round, several rounds: both a function
            # that carries millions of items and the churn of new ones.
            fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
                lambda v: total.__setitem__(0, total[0] + v),
                max_queue_size=64,
            )
            sent += await anyio.to_thread.run_sync(_push_round, fn, 8, 40_000)
            fn.release()
            await fn.wait_closed()
            delivered = total[0]
            assert delivered == sent
            gauge.sample()
        assert sent > 0

    run_on(anyio_backend, main)
    gauge.assert_flat()


@pytest.mark.soak
def test_soak_millions_of_items_through_streams_keep_memory_flat(
    anyio_backend: Backend,
) -> None:
    gauge = Gauge()
    seconds = 25

    def count(emit: Callable[[int], None], n: int) -> int:
        for i in range(n):
            emit(i)
        return n

    async def main() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or len(gauge.samples) < 6:
            for latest, size in ((False, 64), (False, 1), (True, 64)):
                seen = 0
                async with tsfn.stream(count, 50_000, max_queue_size=size, latest=latest) as items:
                    async for _ in items:
                        seen += 1
                assert items.result == 50_000
                assert seen == 50_000 or latest
                # and one left early, so the abort path is soaked too
                async with tsfn.stream(count, 10**9, max_queue_size=size) as items:
                    async for item in items:
                        if item == 1000:
                            break
            gauge.sample()

    run_on(anyio_backend, main)
    gauge.assert_flat()


@pytest.mark.soak
def test_soak_creating_and_closing_functions_and_works_keeps_memory_flat(
    anyio_backend: Backend,
) -> None:
    gauge = Gauge()
    seconds = 15
    refs: list[weakref.ref[Any]] = []

    async def main() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or len(gauge.samples) < 6:
            refs.clear()  # a sample of this round's functions; the list must not grow
            for n in range(2000):
                fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
                    lambda _: None, max_queue_size=n % 3
                )
                fn.call_nowait(n)
                if n % 2:
                    fn.abort()
                else:
                    fn.release()
                await fn.wait_closed()
                if n % 100 == 0:
                    refs.append(weakref.ref(fn))
                    assert await tsfn.AsyncWork(lambda x: x, data=n) == n
            gauge.sample()

    run_on(anyio_backend, main)
    gauge.assert_flat()
    gc.collect()
    assert all(ref() is None for ref in refs)


@pytest.mark.soak
def test_soak_many_short_lived_loops_keep_memory_flat(anyio_backend: Backend) -> None:
    """A program that runs tsfn on a new loop per job (asyncio.run per request) must
    not pay for every loop it ever ran."""
    gauge = Gauge()
    seconds = 10

    async def job() -> None:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
        fn.call(1)
        fn.release()
        await fn.wait_closed()

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(gauge.samples) < 6:
        for _ in range(500):
            run_on(anyio_backend, job)
        gauge.sample()
    gauge.assert_flat(objects_slack=2000)
