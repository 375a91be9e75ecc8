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

Peer libraries are imported lazily, so a memory-measuring child process pays only for
the one it measures, and a missing one disables its rows instead of the run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["BRIDGES", "Bridge", "available", "describe"]

Deliver = Callable[[Any], None]
Send = Callable[[Any], object]


class Bridge:
    """One run's channel: `start` and `stop` on the loop, the rest on producer threads.

    `n` is the number of items the run delivers in all; consumer tasks use it to know
    when to stop, so no sentinel or shutdown path is part of the measured work.
    """

    name: ClassVar[str]
    module: ClassVar[str]  # what must be importable for this bridge to run

    def __init__(self, deliver: Deliver, *, n: int, producers: int, maxsize: int) -> None:
        self.deliver = deliver
        self.n = n
        self.producers = producers
        self.maxsize = maxsize
        self._consumer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Set up on the loop thread, before any producer runs."""

    def sender(self) -> Send:
        """Called once in each producer thread; returns what it calls per item."""
        raise NotImplementedError

    def producer_done(self) -> None:
        """Called by each producer thread after its last item."""

    async def stop(self) -> None:
        """Tidy up on the loop after every item was delivered and producers returned."""
        if self._consumer is not None:
            await self._consumer

    def abort(self) -> None:
        """Best effort to unblock producers of a run that hung (it has already failed)."""
        if self._consumer is not None:
            self._consumer.cancel()

    def _consume(self, get: Callable[[], Any]) -> None:
        """Start a task that awaits `get()` `n` times, delivering each item."""

        async def consume() -> None:
            deliver = self.deliver
            for _ in range(self.n):
                deliver(await get())

        self._consumer = asyncio.get_running_loop().create_task(consume())


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
        self.loop = asyncio.get_running_loop()
        self.room = threading.BoundedSemaphore(self.maxsize or 1)

    def sender(self) -> Send:
        call, deliver = self.loop.call_soon_threadsafe, self.deliver
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


def available(name: str) -> str | None:
    """None if bridge `name` can run here, else why not (shown in the skipped rows)."""
    bridge = BRIDGES[name]
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
    }
    unbounded = {
        "tsfn": "ThreadsafeFunction(cb).call(x)",
        "call_soon_threadsafe": "loop.call_soon_threadsafe(cb, x)",
        "run_coroutine_threadsafe": "run_coroutine_threadsafe(async_cb(x), loop)",
        "janus": "janus.Queue(): sync_q.put(x) / async_q.get()",
        "culsans": "culsans.Queue(): sync_q.put(x) / async_q.get()",
        "aiologic": "aiologic.SimpleQueue(): green_put(x) / async_get()",
        "anyio": "from_thread.run_sync(cb, x, token=...)",
    }
    return (bounded if maxsize else unbounded)[name]
