"""The ways to move items from threads to a callback on the loop: tsfn and its peers.

Each bridge is what a user would write with that library, done the fastest way its
public API allows: producer threads get the most direct callable (`fn.call`,
`q.sync_q.put`, ...), and where a library has no callback of its own, one consumer
task on the loop awaits each item and hands it to the same `deliver` callable.

Every bridge has an unbounded form (``maxsize == 0``) and a bounded one, where a
producer blocks until the item fits among ``maxsize`` undelivered ones. Libraries
without a bounded queue get the textbook construction their users reach for: raw
`call_soon_threadsafe` behind a `threading.BoundedSemaphore`, released by the
callback; `run_coroutine_threadsafe(queue.put(item)).result()` into an
`asyncio.Queue(maxsize)`; and anyio's `from_thread.run(send_stream.send, item)` into
a memory object stream of that size.

On trio (`BRIDGES_ON_TRIO`), tsfn and anyio meet trio's own ways: raw
`TrioToken.run_sync_soon` per item, and a trio memory channel fed with it, the
hand-written queue of a trio program.

Peer libraries are imported lazily, so a memory-measuring child process pays only for
the one it measures, and a missing one disables its rows instead of the run; anyio
alone is always imported, as the runs' own task groups are anyio's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import anyio
import anyio.abc

__all__ = ["BRIDGES", "BRIDGES_ON_TRIO", "Bridge", "available", "bridges", "describe"]

Deliver = Callable[[Any], None]
Send = Callable[[Any], object]


class Bridge:
    """One run's channel: `start` and `stop` on the loop, the rest on producer threads.

    `n` is the number of items the run delivers in all; consumer tasks use it to know
    when to stop, so no sentinel or shutdown path is part of the measured work. They
    run in `tasks`, the run's task group.
    """

    name: ClassVar[str]
    module: ClassVar[str]  # what must be importable for this bridge to run

    def __init__(
        self,
        deliver: Deliver,
        *,
        n: int,
        producers: int,
        maxsize: int,
        tasks: anyio.abc.TaskGroup,
    ) -> None:
        self.deliver = deliver
        self.n = n
        self.producers = producers
        self.maxsize = maxsize
        self._tasks = tasks
        self._consumed: anyio.Event | None = None

    async def start(self) -> None:
        """Set up on the loop thread, before any producer runs."""

    def sender(self) -> Send:
        """Called once in each producer thread; returns what it calls per item."""
        raise NotImplementedError

    def producer_done(self) -> None:
        """Called by each producer thread after its last item."""

    async def stop(self) -> None:
        """Tidy up on the loop after every item was delivered and producers returned."""
        if self._consumed is not None:
            await self._consumed.wait()

    def abort(self) -> None:
        """Best effort to unblock producers of a run that hung (it has already failed)."""
        self._tasks.cancel_scope.cancel()

    def _consume(self, get: Callable[[], Awaitable[Any]]) -> None:
        """Start a task that awaits `get()` `n` times, delivering each item."""
        consumed = self._consumed = anyio.Event()

        async def consume() -> None:
            deliver = self.deliver
            for _ in range(self.n):
                deliver(await get())
            consumed.set()

        self._tasks.start_soon(consume)


class TsfnBridge(Bridge):
    """`tsfn.ThreadsafeFunction(deliver)`: every producer is one of its threads."""

    name = "tsfn"
    module = "tsfn"

    async def start(self) -> None:
        import tsfn

        self.fn: tsfn.ThreadsafeFunction[Any] = tsfn.ThreadsafeFunction(
            self.deliver,
            max_queue_size=self.maxsize,
            initial_thread_count=self.producers,
            name="benchmark",
        )

    def sender(self) -> Send:
        return self.fn.call

    def producer_done(self) -> None:
        self.fn.release()

    async def stop(self) -> None:
        await self.fn.wait_closed()

    def abort(self) -> None:
        self.fn.abort()


class RawBridge(Bridge):
    """`loop.call_soon_threadsafe(deliver, item)` per item; bounded: plus a semaphore."""

    name = "call_soon_threadsafe"
    module = "asyncio"

    async def start(self) -> None:
        self.schedule = self._scheduler()
        self.room = threading.BoundedSemaphore(self.maxsize or 1)

    @staticmethod
    def _scheduler() -> Callable[..., object]:
        """The loop's own "run this callback with these arguments" from any thread."""
        return asyncio.get_running_loop().call_soon_threadsafe

    def sender(self) -> Send:
        call, deliver = self.schedule, self.deliver
        if not self.maxsize:

            def send(item: Any) -> None:
                call(deliver, item)

            return send
        acquire, release = self.room.acquire, self.room.release

        def deliver_and_release(item: Any) -> None:
            release()
            deliver(item)

        def send_bounded(item: Any) -> None:
            acquire()
            call(deliver_and_release, item)

        return send_bounded


class RunSyncSoonBridge(RawBridge):
    """trio's `TrioToken.run_sync_soon(deliver, item)` per item; bounded: plus a semaphore."""

    name = "run_sync_soon"
    module = "trio"

    @staticmethod
    def _scheduler() -> Callable[..., object]:
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


class ChannelBridge(Bridge):
    """A trio memory channel fed with `run_sync_soon(send.send_nowait, item)`; one task
    receives and delivers.

    Bounded, the channel itself is unbounded and a `threading.Semaphore(maxsize)`
    acquired by the producer and released by the consumer as it takes an item keeps
    at most `maxsize` items between them. That is the fastest honest hand-written
    bound: a channel of `maxsize` cannot be fed with `send_nowait` from a callback (it
    would raise `WouldBlock` when full), and `trio.from_thread.run(send.send, item)`
    into a channel of `maxsize` is a blocking round trip to the run per item: 8-19 k
    items/s here against 26-48 k for the semaphore (1-16 producers, one try).
    """

    name = "memory_channel"
    module = "trio"

    async def start(self) -> None:
        import trio

        self.schedule = trio.lowlevel.current_trio_token().run_sync_soon
        self.tx, self.rx = trio.open_memory_channel[Any](math.inf)
        receive = self.rx.receive
        if not self.maxsize:
            self._consume(receive)
            return
        self.room = threading.Semaphore(self.maxsize)
        release = self.room.release

        async def receive_and_release() -> Any:
            item = await receive()
            release()
            return item

        self._consume(receive_and_release)

    def sender(self) -> Send:
        call, put = self.schedule, self.tx.send_nowait
        if not self.maxsize:

            def send(item: Any) -> None:
                call(put, item)

            return send
        acquire = self.room.acquire

        def send_bounded(item: Any) -> None:
            acquire()
            call(put, item)

        return send_bounded

    async def stop(self) -> None:
        await super().stop()
        self.tx.close()
        self.rx.close()


class CoroutineBridge(Bridge):
    """`asyncio.run_coroutine_threadsafe`: fire-and-forget, or awaited `Queue.put`."""

    name = "run_coroutine_threadsafe"
    module = "asyncio"

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.maxsize:
            self.queue: asyncio.Queue[Any] = asyncio.Queue(self.maxsize)
            self._consume(self.queue.get)

    def sender(self) -> Send:
        loop, deliver, run = self.loop, self.deliver, asyncio.run_coroutine_threadsafe
        if not self.maxsize:

            async def deliver_async(item: Any) -> None:
                deliver(item)

            def send(item: Any) -> object:
                return run(deliver_async(item), loop)

            return send
        put = self.queue.put

        def send_bounded(item: Any) -> None:
            run(put(item), loop).result()

        return send_bounded


class JanusBridge(Bridge):
    """`janus.Queue(maxsize)`: `sync_q.put` on threads, `async_q.get` in a task."""

    name = "janus"
    module = "janus"

    async def start(self) -> None:
        import janus

        self.queue: Any = janus.Queue(self.maxsize)
        self._consume(self.queue.async_q.get)

    def sender(self) -> Send:
        send: Send = self.queue.sync_q.put
        return send

    async def stop(self) -> None:
        await super().stop()
        await self.queue.aclose()


class CulsansBridge(JanusBridge):
    """`culsans.Queue(maxsize)` through its janus-compatible `sync_q` / `async_q`."""

    name = "culsans"
    module = "culsans"

    async def start(self) -> None:
        import culsans

        self.queue = culsans.Queue(self.maxsize)
        self._consume(self.queue.async_q.get)


class AiologicBridge(Bridge):
    """aiologic `SimpleQueue` (unbounded) or `Queue(maxsize)`: `green_put`/`async_get`."""

    name = "aiologic"
    module = "aiologic"

    async def start(self) -> None:
        import aiologic

        self.queue: Any = aiologic.Queue(self.maxsize) if self.maxsize else aiologic.SimpleQueue()
        self._consume(self.queue.async_get)

    def sender(self) -> Send:
        send: Send = self.queue.green_put
        return send


class AnyioBridge(Bridge):
    """anyio `from_thread.run_sync(deliver)`, or `from_thread.run(stream.send)` bounded.

    Both wait for the loop on every item (anyio has no fire-and-forget call from a
    thread); the loop is named by an `EventLoopToken` (anyio >= 4.11), so producers
    can be plain threads like everyone else's.
    """

    name = "anyio"
    module = "anyio"

    async def start(self) -> None:
        import anyio
        import anyio.lowlevel

        self.token = anyio.lowlevel.current_token()
        if self.maxsize:
            self.tx, self.rx = anyio.create_memory_object_stream[Any](self.maxsize)
            self._consume(self.rx.receive)

    def sender(self) -> Send:
        from anyio import from_thread

        token, deliver = self.token, self.deliver
        if not self.maxsize:

            def send(item: Any) -> None:
                from_thread.run_sync(deliver, item, token=token)

            return send
        put = self.tx.send

        def send_bounded(item: Any) -> None:
            from_thread.run(put, item, token=token)

        return send_bounded

    async def stop(self) -> None:
        await super().stop()
        if self.maxsize:
            self.tx.close()
            self.rx.close()


BRIDGES: dict[str, type[Bridge]] = {
    b.name: b
    for b in (
        TsfnBridge,
        RawBridge,
        CoroutineBridge,
        JanusBridge,
        CulsansBridge,
        AiologicBridge,
        AnyioBridge,
    )
}
# On trio, the asyncio-only peers give way to trio's own ways.
BRIDGES_ON_TRIO: dict[str, type[Bridge]] = {
    b.name: b for b in (TsfnBridge, RunSyncSoonBridge, AnyioBridge, ChannelBridge)
}


def bridges(loop: str) -> dict[str, type[Bridge]]:
    """The bridges that run on `loop` ("asyncio", "uvloop" or "trio"), in table order."""
    return BRIDGES_ON_TRIO if loop == "trio" else BRIDGES


def available(name: str) -> str | None:
    """None if bridge `name` can run here, else why not (shown in the skipped rows)."""
    bridge = {**BRIDGES, **BRIDGES_ON_TRIO}[name]
    if importlib.util.find_spec(bridge.module) is None:
        return f"{bridge.module} is not installed"
    if bridge is TsfnBridge:
        import tsfn

        if not hasattr(tsfn, "ThreadsafeFunction"):
            return "tsfn.ThreadsafeFunction does not exist yet"
    if bridge is AnyioBridge:
        import anyio.lowlevel

        if not hasattr(anyio.lowlevel, "current_token"):
            return "anyio < 4.11 has no EventLoopToken for plain threads"
    return None


def describe(name: str, maxsize: int) -> str:
    """What the bridge does, for the table's legend."""
    bounded = {
        "tsfn": "ThreadsafeFunction(cb, max_queue_size=N).call(x)",
        "call_soon_threadsafe": "BoundedSemaphore(N) + loop.call_soon_threadsafe(cb, x)",
        "run_coroutine_threadsafe": "run_coroutine_threadsafe(asyncio.Queue(N).put(x)).result()",
        "janus": "janus.Queue(N): sync_q.put(x) / async_q.get()",
        "culsans": "culsans.Queue(N): sync_q.put(x) / async_q.get()",
        "aiologic": "aiologic.Queue(N): green_put(x) / async_get()",
        "anyio": "from_thread.run(memory_object_stream(N).send, x, token=...)",
        "run_sync_soon": "BoundedSemaphore(N) + token.run_sync_soon(cb, x)",
        "memory_channel": "Semaphore(N) + token.run_sync_soon(send.send_nowait, x) / receive()",
    }
    unbounded = {
        "tsfn": "ThreadsafeFunction(cb).call(x)",
        "call_soon_threadsafe": "loop.call_soon_threadsafe(cb, x)",
        "run_coroutine_threadsafe": "run_coroutine_threadsafe(async_cb(x), loop)",
        "janus": "janus.Queue(): sync_q.put(x) / async_q.get()",
        "culsans": "culsans.Queue(): sync_q.put(x) / async_q.get()",
        "aiologic": "aiologic.SimpleQueue(): green_put(x) / async_get()",
        "anyio": "from_thread.run_sync(cb, x, token=...)",
        "run_sync_soon": "token.run_sync_soon(cb, x)",
        "memory_channel": "token.run_sync_soon(send.send_nowait, x) / receive()",
    }
    return (bounded if maxsize else unbounded)[name]
