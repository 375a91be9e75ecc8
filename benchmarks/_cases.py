"""What one benchmark run does, on one event loop, for one bridge.

Every run follows the same script: the bridge is set up on a fresh loop; producer
threads are started and wait on a `threading.Barrier` together with the loop thread;
the clock starts when the barrier opens and stops inside the callback that receives
the last item. Then the producers are joined, the bridge is closed, and the sink
checks that exactly the items sent arrived (a wrong sum fails the run, and so does a
run that does not finish within its timeout). The script is written with anyio, so
it is the same on asyncio's loop, uvloop and a `trio.run`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel

from benchmarks._peers import Bridge, Send
from tsfn._asyncio import asyncio_run

__all__ = [
    "Failed",
    "LatencySink",
    "Sink",
    "drive",
    "floor",
    "latency",
    "loop_kinds",
    "run_on",
    "stream_handwritten",
    "stream_tsfn",
    "throughput",
]

T = TypeVar("T")
Work = Callable[[Send], None]


class Failed(Exception):
    """A run delivered the wrong items, hung, or a producer raised."""


def loop_kinds() -> list[str]:
    """The event loops the cases run on: asyncio's default, then uvloop and trio if
    installed."""
    return ["asyncio"] + [kind for kind in ("uvloop", "trio") if importlib.util.find_spec(kind)]


def run_on(kind: str, main: Callable[[], Awaitable[T]]) -> T:
    """`main()` run to completion on a fresh loop of `kind` ("asyncio", "uvloop", "trio")."""

    async def wrapped() -> T:
        return await main()

    if kind == "trio":
        import trio

        return trio.run(wrapped)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if kind == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    return asyncio_run(wrapped(), loop_factory=factory)


class Sink:
    """The per-item work: add the item to a sum. The same in every method and the floor."""

    __slots__ = ("count", "end", "finished", "n", "total")

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.total = 0
        self.end = 0.0
        self.finished: Callable[[], object] = _nothing

    def put(self, item: int) -> None:
        self.total += item
        self.count += 1
        if self.count == self.n:
            self.end = time.perf_counter()
            self.finished()

    def check(self) -> None:
        expected = self.n * (self.n - 1) // 2
        if self.count != self.n or self.total != expected:
            raise Failed(
                f"wrong result: {self.count} items summing to {self.total}, "
                f"expected {self.n} items summing to {expected}"
            )


class LatencySink(Sink):
    """Items are `perf_counter_ns()` stamps taken just before the call; keep the delays."""

    __slots__ = ("samples",)

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.samples: list[int] = []

    def put(self, item: int) -> None:
        self.samples.append(time.perf_counter_ns() - item)
        self.count += 1
        if self.count == self.n:
            self.end = time.perf_counter()
            self.finished()

    def check(self) -> None:
        if self.count != self.n:
            raise Failed(f"wrong result: {self.count} items arrived, expected {self.n}")


def _nothing() -> None:
    pass


def _producer(
    bridge: Bridge, barrier: threading.Barrier, work: Work, errors: list[BaseException]
) -> None:
    try:
        send = bridge.sender()
        barrier.wait()
        work(send)
        bridge.producer_done()
    except BaseException as exc:
        errors.append(exc)
        barrier.abort()


async def drive(
    bridge_type: type[Bridge], sink: Sink, works: list[Work], *, maxsize: int, timeout: float
) -> float:
    """Run `works` on one thread each through a new bridge into `sink`; return seconds."""
    failure: Failed | None = None
    # The bridge's consumer tasks live in this group; a failed run cancels them. The
    # failure is raised outside the group, so it is not wrapped in an exception group.
    async with anyio.create_task_group() as tasks:
        bridge = bridge_type(sink.put, n=sink.n, producers=len(works), maxsize=maxsize, tasks=tasks)
        try:
            seconds = await _drive(bridge, sink, works, timeout)
        except Failed as exc:
            failure = exc
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return seconds


async def _drive(bridge: Bridge, sink: Sink, works: list[Work], timeout: float) -> float:
    done = anyio.Event()
    sink.finished = done.set
    await bridge.start()
    await anyio.lowlevel.checkpoint()  # let consumer tasks reach their first `get`
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(works) + 1)
    threads = [
        threading.Thread(target=_producer, args=(bridge, barrier, w, errors), daemon=True)
        for w in works
    ]
    for thread in threads:
        thread.start()
    try:
        # Blocking the loop here is fine: nothing can be sent before the barrier opens.
        barrier.wait(timeout)
    except threading.BrokenBarrierError:
        raise Failed(f"a producer failed to start: {errors!r}") from None
    start = time.perf_counter()
    with anyio.move_on_after(timeout):
        await done.wait()
    if not done.is_set():
        bridge.abort()
        raise Failed(f"hung: {sink.count} of {sink.n} items delivered after {timeout:g} s")
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads):
        if time.monotonic() > deadline:
            raise Failed("hung: a producer did not return after its last item was delivered")
        await anyio.sleep(0.0005)
    with anyio.fail_after(timeout):
        await bridge.stop()
    if errors:
        raise Failed(f"a producer raised {errors[0]!r}") from errors[0]
    sink.check()
    return sink.end - start


def _count_from(first: int, step: int, n: int) -> Work:
    def work(send: Send) -> None:
        for i in range(first, n, step):
            send(i)

    return work


async def throughput(
    bridge_type: type[Bridge], *, n: int, producers: int, maxsize: int, timeout: float
) -> float:
    """Seconds to deliver 0..n-1, producer k sending k, k+P, k+2P, ..."""
    works = [_count_from(k, producers, n) for k in range(producers)]
    return await drive(bridge_type, Sink(n), works, maxsize=maxsize, timeout=timeout)


def floor(n: int) -> float:
    """Seconds for the same per-item work on one thread, with no thread or loop between."""
    sink = Sink(n)
    put = sink.put
    start = time.perf_counter()
    for i in range(n):
        put(i)
    elapsed = time.perf_counter() - start
    sink.check()
    return elapsed


def _stamps(count: int, interval: float) -> Work:
    def work(send: Send) -> None:
        clock, sleep = time.perf_counter_ns, time.sleep
        for _ in range(count):
            send(clock())
            if interval:
                sleep(interval)

    return work


async def latency(
    bridge_type: type[Bridge],
    *,
    n: int,
    producers: int,
    maxsize: int,
    interval: float,
    timeout: float,
) -> list[int]:
    """Nanoseconds from just before each call to its callback, for n items in all."""
    sink = LatencySink(n)
    counts = [n // producers + (k < n % producers) for k in range(producers)]
    works = [_stamps(c, interval) for c in counts]
    await drive(bridge_type, sink, works, maxsize=maxsize, timeout=timeout)
    return sink.samples


def _count_to(emit: Callable[[int], object], n: int) -> int:
    for i in range(n):
        emit(i)
    return n


async def stream_tsfn(n: int, maxsize: int, timeout: float) -> float:
    """Seconds for `tsfn.stream` to carry 0..n-1 from a worker to an `async for`."""
    import tsfn

    async def consume() -> int:
        total = 0
        async with tsfn.stream(_count_to, n, max_queue_size=maxsize) as items:
            async for item in items:
                total += item
        if items.result != n:
            raise Failed(f"stream result {items.result!r}, expected {n}")
        return total

    return await _timed_stream(consume(), n, timeout)


async def stream_handwritten(n: int, maxsize: int, timeout: float) -> float:
    """The same with what users write today: a worker in the default executor calls
    `call_soon_threadsafe(queue.put_nowait, item)` behind a semaphore of `maxsize`
    that the consumer releases, and ends with a sentinel."""
    loop = asyncio.get_running_loop()

    async def consume() -> int:
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        room = threading.Semaphore(maxsize)

        def emit(item: int) -> None:
            room.acquire()
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            _count_to(emit, n)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        total = 0
        while (item := await queue.get()) is not None:
            room.release()
            total += item
        await worker
        return total

    return await _timed_stream(consume(), n, timeout)


async def _timed_stream(consume: Awaitable[int], n: int, timeout: float) -> float:
    start = time.perf_counter()
    try:
        total = await asyncio.wait_for(consume, timeout)
    except asyncio.TimeoutError:
        raise Failed(f"hung: stream not done after {timeout:g} s") from None
    elapsed = time.perf_counter() - start
    if total != n * (n - 1) // 2:
        raise Failed(f"wrong result: sum {total}, expected {n * (n - 1) // 2}")
    return elapsed
