"""Streams out of other processes: a process pool's, and a Dask cluster's.

Each run sends S streams of N small items (each a `perf_counter_ns()` stamp, taken
just before it is emitted or put; that clock is the machine's, shared by its
processes) from S jobs to the loop, with at most 64 items in flight per hop, and
records items/s and each item's delay. The methods:

- ``tsfn``: ``tsfn.stream(func, executor=pool)`` (or ``executor=client``);
- ``Manager relay``: what docs/howto/process-pool.md had users write before: the jobs
  put each item into a `multiprocessing.Manager` queue (bounded, 100), a relay thread
  of this process gets them and calls a ThreadsafeFunction (bounded, 64);
- ``Queue relay``: the same through a plain `multiprocessing.Queue`, which reaches the
  pool's processes through its initializer;
- ``distributed.Queue``: the Dask jobs put batches of 16 items (tsfn's batch for a
  queue of 64) into a `distributed.Queue` of 4 batches; a relay thread gets them.

Each method and stream count gets its pool (and manager, queue) before its first run
and keeps it; the Dask cluster (two worker processes, two threads each) is started
once. So no run pays for starting processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.util
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import tsfn
from benchmarks._cases import Failed

__all__ = ["METHODS", "available", "close", "run"]

MAXSIZE = 64
DASK_BATCH = 16
POOL_METHODS = ("tsfn", "Manager relay", "Queue relay")
DASK_METHODS = ("tsfn", "distributed.Queue")
METHODS = {"process pool": POOL_METHODS, "Dask": DASK_METHODS}
DONE = None  # what a job sends after its last item (the relays only)

_queue: Any = None  # a Queue relay worker's `multiprocessing.Queue` (initializer)
_resources = contextlib.ExitStack()
_made: dict[tuple[Any, ...], Any] = {}


def available(executor: str) -> str | None:
    """None if `executor`'s rows can run here, else why not."""
    if executor == "Dask" and importlib.util.find_spec("distributed") is None:
        return "distributed is not installed (pip install 'tsfn[dask]')"
    return None


# -- in the worker processes -----------------------------------------------------------


def _stamps(emit: Callable[[int], object], n: int) -> int:
    for _ in range(n):
        emit(time.perf_counter_ns())
    return n


def _to_queue(outbox: Any, n: int) -> None:
    try:
        for _ in range(n):
            outbox.put(time.perf_counter_ns())
    finally:
        outbox.put(DONE)


def _set_queue(queue: Any) -> None:
    global _queue
    _queue = queue


def _to_global_queue(n: int) -> None:
    _to_queue(_queue, n)


def _distributed() -> Any:
    # Imported when used (Dask is optional), and untyped.
    return importlib.import_module("distributed")


def _to_dask_queue(name: str, n: int) -> None:
    outbox = _distributed().Queue(name)
    try:
        for start in range(0, n, DASK_BATCH):
            outbox.put([time.perf_counter_ns() for _ in range(min(DASK_BATCH, n - start))])
    finally:
        outbox.put(DONE)


def _nothing(_: object = None) -> None:
    pass


# -- in this process -------------------------------------------------------------------


class _Delays:
    """The consumer: each item's delay, per stream, and a check that all arrived."""

    def __init__(self, streams: int, n: int) -> None:
        self.expected = streams * n
        self.samples: list[int] = []
        self.end = 0.0
        self.done = asyncio.Event()

    def put(self, stamp: int) -> None:
        self.samples.append(time.perf_counter_ns() - stamp)
        if len(self.samples) == self.expected:
            self.end = time.perf_counter()
            self.done.set()

    def check(self) -> None:
        if len(self.samples) != self.expected:
            raise Failed(f"wrong result: {len(self.samples)} items, expected {self.expected}")


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _kept(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """What `make()` made for `key` the first time: pools, managers and the cluster
    are started once, before their first run, and kept until `close()`."""
    if key not in _made:
        _made[key] = make()
    return _made[key]


def _pool(workers: int, queue: Any = None) -> concurrent.futures.ProcessPoolExecutor:
    init: dict[str, Any] = {"initializer": _set_queue, "initargs": (queue,)} if queue else {}
    pool = _resources.enter_context(
        concurrent.futures.ProcessPoolExecutor(workers, mp_context=_context(), **init)
    )
    for _ in concurrent.futures.as_completed([pool.submit(_nothing) for _ in range(workers)]):
        pass  # every process started
    return pool


def _client() -> Any:
    def start() -> Any:
        distributed = _distributed()
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # any free port: never another cluster's 8787
        )
        _resources.callback(cluster.close)
        client = distributed.Client(cluster)
        # Not `with client`: that sets a context variable, which would be reset in
        # another context than the asyncio run that set it.
        _resources.callback(client.close)
        client.run(_nothing)  # every worker imports this module, and tsfn, now
        return client

    return _kept(("dask",), start)


def close() -> None:
    """Shut down every pool, manager and cluster the runs started."""
    _made.clear()
    _resources.close()


async def _through_tsfn(executor: Any, delays: _Delays, streams: int, n: int) -> float:
    async def one() -> None:
        async with tsfn.stream(_stamps, n, executor=executor, max_queue_size=MAXSIZE) as items:
            async for stamp in items:
                delays.put(stamp)
        if items.result != n:
            raise Failed(f"stream result {items.result!r}, expected {n}")

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    return delays.end - start


def _relay(inbox: Any, fn: tsfn.ThreadsafeFunction[int], senders: int) -> None:
    """The hand-written relay thread of the how-to, taking lists (Dask) or items."""
    try:
        while senders:
            got = inbox.get()
            if got is DONE:
                senders -= 1
            elif isinstance(got, (list, tuple)):  # Dask sends lists as tuples
                for item in got:
                    fn.call(item)
            else:
                fn.call(got)
    except tsfn.Closing:
        pass
    finally:
        fn.release()


async def _through_relay(
    submit: Callable[[], list[Any]], inbox: Any, delays: _Delays, streams: int
) -> float:
    async with tsfn.ThreadsafeFunction(delays.put, max_queue_size=MAXSIZE) as fn:
        relay = threading.Thread(target=_relay, args=(inbox, fn, streams), name="bench-relay")
        start = time.perf_counter()
        relay.start()
        jobs = submit()
        await delays.done.wait()
    relay.join()
    for job in jobs:
        job.result()
    return delays.end - start


async def _run(executor: str, method: str, streams: int, n: int) -> tuple[float, list[int]]:
    delays = _Delays(streams, n)
    if executor == "Dask":
        client = _client()
        if method == "tsfn":
            seconds = await _through_tsfn(client, delays, streams, n)
        else:
            name = f"bench-{time.perf_counter_ns()}"
            inbox = _distributed().Queue(name, client=client, maxsize=MAXSIZE // DASK_BATCH)

            def submit() -> list[Any]:
                return [client.submit(_to_dask_queue, name, n, pure=False) for _ in range(streams)]

            seconds = await _through_relay(submit, inbox, delays, streams)
    elif method == "tsfn":
        pool = _kept((method, streams), lambda: _pool(streams))
        seconds = await _through_tsfn(pool, delays, streams, n)
    elif method == "Manager relay":
        manager = _kept(("manager",), lambda: _resources.enter_context(_context().Manager()))
        pool, inbox = _kept((method, streams), lambda: (_pool(streams), manager.Queue(100)))
        seconds = await _through_relay(
            lambda: [pool.submit(_to_queue, inbox, n) for _ in range(streams)],
            inbox,
            delays,
            streams,
        )
    else:

        def start() -> tuple[concurrent.futures.Executor, Any]:
            inbox = _context().Queue(maxsize=100)
            return _pool(streams, inbox), inbox

        pool, inbox = _kept((method, streams), start)
        seconds = await _through_relay(
            lambda: [pool.submit(_to_global_queue, n) for _ in range(streams)],
            inbox,
            delays,
            streams,
        )
    delays.check()
    return seconds, delays.samples


def run(executor: str, method: str, streams: int, n: int, timeout: float) -> tuple[float, int]:
    """One run on a fresh asyncio loop: (seconds, p50 delay in ns)."""

    async def main() -> tuple[float, list[int]]:
        try:
            return await asyncio.wait_for(_run(executor, method, streams, n), timeout)
        except asyncio.TimeoutError:
            raise Failed(f"hung: {streams} streams of {n} not done after {timeout:g} s") from None

    seconds, samples = asyncio.run(main())
    samples.sort()
    return seconds, samples[len(samples) // 2]
