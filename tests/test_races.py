"""Races provoked on purpose: many threads, tiny queues, a tiny switch interval.

Interleavings differ from run to run; outcomes may not. Each test states an outcome
that must hold for every interleaving (nothing lost or doubled, each thread's order
kept, every blocked caller woken, the finalizer once and last) and runs the scenario
often enough, with the interpreter switching threads as often as it can, that a
wrong interleaving would show up.

Blocked callers also poll every 0.1 s for a loop closed under them (see
`CLOSED_LOOP_POLL` in tsfn/_lifecycle.py). That poll would turn a lost wake-up into a
short stall instead of a hang, so the wake-up tests switch it off: with it off, a
caller that nobody wakes hangs and the test fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from _helpers import WAIT, join_all, join_all_from_loop, start_threads, until

import tsfn
import tsfn._lifecycle

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a real wake-up can free a blocked caller (see the module docstring)."""
    monkeypatch.setattr(tsfn._lifecycle, "CLOSED_LOOP_POLL", 3600.0)


Item = tuple[int, int]  # (producer, sequence number within that producer)


class Record:
    """The loop side's view: everything call_js saw, in the order it saw it."""

    def __init__(self) -> None:
        self.delivered: list[Item] = []
        self.discarded: list[Item] = []
        self.finalized: list[int] = []  # len(delivered + discarded) when the finalizer ran

    def call_js(
        self,
        loop: object,  # the asyncio loop or the trio run's token; None: discarded
        _callback: object,
        _context: object,
        item: Item,
    ) -> object:
        assert not self.finalized, "an item was handed over after the finalizer"
        (self.delivered if loop is not None else self.discarded).append(item)
        return ("result", item)

    def finalizer(self, _context: object) -> None:
        self.finalized.append(len(self.delivered) + len(self.discarded))

    def function(self, max_queue_size: int, producers: int = 1) -> tsfn.ThreadsafeFunction[Item]:
        """A function on the running loop whose every hand-over this record sees."""
        return tsfn.ThreadsafeFunction(
            call_js=self.call_js,
            max_queue_size=max_queue_size,
            initial_thread_count=producers,
            finalizer=self.finalizer,
        )

    def check(self, accepted: dict[int, list[int]], *, discards_a_tail: bool = True) -> None:
        """Nothing lost or doubled, per-producer order kept, finalizer once and last.

        `discards_a_tail`: items were discarded only by an abort, so each producer's
        discarded items are the tail of what it sent (False when callers cancelled
        their own submissions, which discards items anywhere).
        """
        handed_over = self.delivered + self.discarded
        assert len(set(handed_over)) == len(handed_over), "an item was handed over twice"
        expected = {(p, s) for p, seqs in accepted.items() for s in seqs}
        assert set(handed_over) == expected, "accepted items lost, or unknown items made up"
        for producer, seqs in accepted.items():
            delivered = [s for p, s in self.delivered if p == producer]
            assert delivered == sorted(delivered), f"producer {producer}: order not kept"
            if discards_a_tail:
                assert [s for p, s in handed_over if p == producer] == seqs
        assert self.finalized == [len(handed_over)]


def send(fn: tsfn.ThreadsafeFunction[Item], item: Item, how: str) -> object:
    """Queue `item` the way `how` names; retry a QueueFull so no item is skipped.

    Returns the future for "submit", else None. Raises Closing when the function is.
    """
    if how == "call":
        fn.call(item)
    elif how == "submit":
        return fn.submit(item)
    elif how == "nowait":
        while True:
            try:
                fn.call_nowait(item)
                break
            except tsfn.QueueFull:
                time.sleep(0)  # not synchronisation: give the loop the GIL
    else:  # "timed"
        while True:
            try:
                fn.call(item, timeout=0.001)
                break
            except tsfn.QueueFull:
                pass
    return None


HOWS = ["call", "nowait", "timed", "submit"]


# -- many threads, tiny queues ----------------------------------------------------------------


@pytest.mark.usefixtures("tiny_switch_interval")
@pytest.mark.parametrize(("producers", "queue_size"), [(32, 1), (64, 2), (48, 4), (64, 0)])
async def test_many_threads_on_a_tiny_queue_deliver_every_item_once_in_order(
    producers: int, queue_size: int
) -> None:
    items = 30
    record = Record()
    accepted: dict[int, list[int]] = {p: [] for p in range(producers)}
    futures: list[tuple[Item, concurrent.futures.Future[Any]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(producers)
    fn = record.function(queue_size, producers)

    def produce(producer: int) -> None:
        rng = random.Random(producer)
        try:
            start.wait()
            for seq in range(items):
                # Some items are sent as an extra producer of their own, so acquire
                # and release race with the calls and with other releases.
                with fn.acquire() if rng.random() < 0.2 else contextlib.nullcontext():
                    future = send(fn, (producer, seq), rng.choice(HOWS))
                accepted[producer].append(seq)
                if isinstance(future, concurrent.futures.Future):
                    futures.append(((producer, seq), future))
        except BaseException as exc:
            errors.append(exc)
        finally:
            fn.release()

    threads = start_threads(functools.partial(produce, p) for p in range(producers))
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    await join_all_from_loop(threads)

    assert errors == []
    assert all(len(seqs) == items for seqs in accepted.values())
    record.check(accepted)
    assert record.discarded == []  # nobody aborted
    assert all(f.result() == ("result", item) for item, f in futures)
    assert fn.thread_count == 0
    assert fn.qsize() == 0


@pytest.mark.usefixtures("tiny_switch_interval", "no_poll")
@pytest.mark.parametrize("seed", range(6))
async def test_abort_at_a_random_point_wakes_every_caller_and_loses_nothing(seed: int) -> None:
    rng = random.Random(seed)
    producers = rng.choice([32, 48, 64])
    queue_size = rng.choice([1, 2, 3, 4])
    aborter = rng.randrange(producers)
    abort_after = rng.randrange(20)
    record = Record()
    accepted: dict[int, list[int]] = {p: [] for p in range(producers)}
    ended: list[str] = []
    errors: list[BaseException] = []
    fn = record.function(queue_size, producers)

    def produce(producer: int) -> None:
        local = random.Random(seed * 1000 + producer)
        try:
            for seq in range(1_000_000):
                if producer == aborter and seq == abort_after:
                    fn.abort()
                future = send(fn, (producer, seq), local.choice(HOWS))
                accepted[producer].append(seq)
                del future  # its outcome is checked by the submit race test
        except tsfn.Closing:
            ended.append("closing")
        except BaseException as exc:
            errors.append(exc)

    threads = start_threads(functools.partial(produce, p) for p in range(producers))
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    await join_all_from_loop(threads)

    assert errors == []
    assert ended == ["closing"] * producers  # all of them, blocked or not
    record.check(accepted)
    assert fn.closing
    assert fn.closed


# -- nodejs/node#58723: blocked producers must all be woken ----------------------------------


@pytest.mark.usefixtures("no_poll")
@pytest.mark.parametrize("producers", [4, 9, 16])
@pytest.mark.parametrize("queue_size", [1, 2, 5, 64])
async def test_blocking_producers_on_a_small_queue_never_hang(
    producers: int, queue_size: int
) -> None:
    """Node wakes one parked producer per pop and can leave others asleep; tsfn may not."""
    rounds, items = 8, 40
    for round_ in range(rounds):
        delivered: list[Item] = []
        fn = tsfn.ThreadsafeFunction(
            delivered.append, max_queue_size=queue_size, initial_thread_count=producers
        )

        def produce(producer: int, fn: tsfn.ThreadsafeFunction[Item] = fn) -> None:
            # Alternate waits with and without a timeout: both kinds of waiter park
            # on the same condition and both must be woken.
            timeout = 3600.0 if producer % 2 else None
            try:
                for seq in range(items):
                    fn.call((producer, seq), timeout=timeout)
                fn.release()
            except tsfn.Closing:
                pass  # only after a hang, when the test aborts to free us

        threads = start_threads(functools.partial(produce, p) for p in range(producers))
        try:
            with anyio.fail_after(WAIT):
                await fn.wait_closed()
        except TimeoutError:
            fn.abort()  # free the hung producers so the failure is reported, not a hang
            await join_all_from_loop(threads)
            pytest.fail(f"round {round_}: blocked producers were never woken")
        await join_all_from_loop(threads)
        assert sorted(delivered) == [(p, s) for p in range(producers) for s in range(items)]


@pytest.mark.usefixtures("no_poll")
@pytest.mark.parametrize("how", ["abort", "release"])
@pytest.mark.parametrize(("producers", "queue_size"), [(4, 1), (16, 4), (64, 1)])
async def test_closing_wakes_every_blocked_caller_at_once(
    how: str, producers: int, queue_size: int
) -> None:
    """Abort, or the last release, wakes all callers blocked on a full queue with Closing.

    The loop thread does not yield until every producer has returned, so no item is
    ever drained: the only way out for a blocked caller is the wake-up on closing.
    """
    record = Record()
    fn = record.function(queue_size)
    for seq in range(queue_size):
        fn.call_nowait((-1, seq))  # full, and nothing will drain it
    outcomes: list[object] = []
    ready = threading.Barrier(producers + 1)

    def produce(producer: int) -> None:
        ready.wait()
        try:
            fn.call((producer, 0), timeout=3600.0 if producer % 2 else None)
            outcomes.append("accepted")
        except BaseException as exc:
            outcomes.append(exc)

    threads = start_threads(functools.partial(produce, p) for p in range(producers))
    ready.wait()
    if how == "abort":
        threading.Thread(target=fn.abort).start()
    else:
        threading.Thread(target=fn.release).start()  # the one and only producer count
    join_all(threads)  # deliberately blocking the loop thread: see the docstring

    assert [type(o) for o in outcomes] == [tsfn.Closing] * producers
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    if how == "abort":
        assert record.discarded == [(-1, s) for s in range(queue_size)]
    else:
        assert record.delivered == [(-1, s) for s in range(queue_size)]
    assert record.finalized == [queue_size]


async def test_producers_that_keep_calling_after_closing_do_not_stall_the_loop() -> None:
    """A producer may treat Closing as "drop it" and keep going (a log handler does).

    Its calls all raise Closing, and the loop, which has nothing left to wait for but
    the backlog already queued, must finish the function while those producers are
    still calling, rather than wait until they stop. (How long the backlog takes
    depends on the machine; whether the producers stopped first does not.) Abort, not
    release: both finish through the same wait for in-flight calls, but release must
    deliver the backlog eight unpaced producers pile up, which in asyncio's debug mode
    takes longer than any sane timeout.
    """
    producers = 8
    still_calling: list[bool] = []
    delivered: list[None] = []
    stop = threading.Event()
    fn = tsfn.ThreadsafeFunction(
        delivered.append, finalizer=lambda _: still_calling.append(not stop.is_set())
    )

    def hammer() -> None:
        while not stop.is_set():
            with contextlib.suppress(tsfn.Closing):
                fn.call(None)

    threads = start_threads([hammer] * producers)
    await until(lambda: len(delivered) >= 1_000)  # all of them hard at it
    fn.abort()
    try:
        with anyio.fail_after(WAIT):
            await fn.wait_closed()
    finally:
        stop.set()
        await join_all_from_loop(threads)
    assert still_calling == [True], "the finalizer waited for the producers to stop"


# -- submit futures cancelled by their callers while the loop delivers ----------------------


@pytest.mark.usefixtures("tiny_switch_interval")
async def test_submitters_cancelling_their_futures_race_delivery_without_loss() -> None:
    producers, items = 16, 60
    record = Record()
    fn = record.function(2, producers)
    outcomes: list[tuple[Item, bool, concurrent.futures.Future[Any]]] = []

    def produce(producer: int) -> None:
        for seq in range(items):
            future = fn.submit((producer, seq))
            outcomes.append(((producer, seq), seq % 2 == 0 and future.cancel(), future))
        fn.release()

    threads = start_threads(functools.partial(produce, p) for p in range(producers))
    with anyio.fail_after(WAIT):
        await fn.wait_closed()
    await join_all_from_loop(threads)

    record.check({p: list(range(items)) for p in range(producers)}, discards_a_tail=False)
    delivered = set(record.delivered)
    for item, was_cancelled, future in outcomes:
        if was_cancelled:
            # Cancelled before delivery: discarded. Or the loop had just checked the
            # future and delivers anyway: the callback ran, once, and nothing more.
            assert future.cancelled()
        else:
            assert item in delivered
            assert future.result() == ("result", item)
    assert set(record.discarded) <= {item for item, cancelled, _ in outcomes if cancelled}


# -- streams whose consumers leave at random points -----------------------------------------


@pytest.mark.usefixtures("tiny_switch_interval")
@pytest.mark.parametrize("latest", [False, True], ids=["queue", "latest"])
async def test_many_streams_left_early_stop_their_workers_and_keep_order(latest: bool) -> None:
    streams = 16
    executor = concurrent.futures.ThreadPoolExecutor(streams)
    rng = random.Random(7)

    async def one(stop_after: int, max_queue_size: int) -> None:
        emitted: list[int] = []
        worker_done = threading.Event()

        def worker(emit: Callable[[int], None]) -> None:
            try:
                for i in range(200):
                    emit(i)
                    emitted.append(i)
            except tsfn.Closing:
                assert tsfn.cancelled()
            finally:
                worker_done.set()

        seen: list[int] = []
        async with tsfn.stream(
            worker, max_queue_size=max_queue_size, latest=latest, executor=executor
        ) as items:
            async for item in items:
                seen.append(item)
                if len(seen) == stop_after:
                    break
        assert worker_done.is_set(), "the block exited before the worker returned"
        assert seen == sorted(set(seen)), "items out of order or repeated"
        if latest:
            assert set(seen) <= set(emitted)
        else:
            assert seen == list(range(len(seen)))
            # Backpressure: never more than max_queue_size + 1 ahead of the reader
            # (emitted counts items whose emit() returned).
            if max_queue_size:
                assert len(emitted) <= len(seen) + max_queue_size + 1

    try:
        async with anyio.create_task_group() as streams_running:
            for _ in range(streams):
                streams_running.start_soon(one, rng.randrange(1, 50), rng.choice([1, 2, 4]))
    finally:
        await anyio.to_thread.run_sync(executor.shutdown)


@pytest.mark.usefixtures("tiny_switch_interval")
async def test_latest_stream_always_delivers_the_last_item_under_races() -> None:
    for round_ in range(20):
        last = 300 + round_

        def worker(emit: Callable[[int], None], last: int = last) -> None:
            for i in range(last + 1):
                emit(i)

        seen: list[int] = []
        async with tsfn.stream(worker, latest=True) as items:
            async for item in items:
                seen.append(item)
                if item % 7 == 0:
                    await anyio.lowlevel.checkpoint()  # a slow reader, so items are dropped
        assert seen[-1] == last
        assert seen == sorted(set(seen))


# -- AsyncWork cancelled while a worker may be picking it up --------------------------------


@pytest.mark.usefixtures("tiny_switch_interval")
@pytest.mark.parametrize("own_executor", [False, True], ids=["default", "own"])
async def test_cancel_racing_start_either_runs_or_cancels_never_both(own_executor: bool) -> None:
    executor = concurrent.futures.ThreadPoolExecutor(2) if own_executor else None
    ran: set[int] = set()
    completions: dict[int, list[tsfn.Status]] = {}

    def execute(n: int) -> int:
        ran.add(n)
        return n

    def complete(status: tsfn.Status, n: int) -> None:
        completions.setdefault(n, []).append(status)

    works = [tsfn.AsyncWork(execute, complete, data=n, executor=executor) for n in range(200)]
    cancels: dict[int, bool] = {}
    for n, work in enumerate(works):
        work.queue()
        if n % 3:
            cancels[n] = work.cancel()
    results = [await _outcome(work) for work in works]  # all queued already: they race
    if executor is not None:
        executor.shutdown()

    for n, result in enumerate(results):
        assert len(completions[n]) == 1, f"complete ran {completions[n]} for work {n}"
        if cancels.get(n):
            assert n not in ran
            assert isinstance(result, asyncio.CancelledError)
            assert completions[n] == [tsfn.Status.CANCELLED]
        else:
            assert n in ran
            assert result == n
            assert completions[n] == [tsfn.Status.OK]


async def _outcome(work: tsfn.AsyncWork[int, int]) -> object:
    """What awaiting `work` gave: its result, or the CancelledError it raised."""
    try:
        return await work
    except asyncio.CancelledError as exc:  # work.cancel()'s, on every loop (the API)
        return exc
