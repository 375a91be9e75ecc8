"""`tsfn.stream`: node-addon-api's AsyncProgressQueueWorker / AsyncProgressWorker.

A function runs on a worker thread and `emit`s items; the loop side reads them with
`async for`. Underneath is one ThreadsafeFunction whose single producer is the
worker: `emit` is a blocking `call`, the worker's return is its `release`, and the
finalizer marks the end of the stream, so every item emitted before the end (or
before an exception) is read first.

Backpressure counts every buffer: a delivered item keeps its slot in the function's
bounded queue until the consumer has read it, so the queue and the stream's buffer
together hold at most `max_queue_size` items, and the worker is never more than
`max_queue_size + 1` items ahead (the `+ 1` is the item in its hand).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, Generic, TypeVar

from ._cancel import CancelFlag, run_with_flag
from ._checks import check_callable, check_count
from ._errors import Closing
from ._function import ThreadsafeFunction

__all__ = ["Stream", "stream"]

Y = TypeVar("Y")
R = TypeVar("R")

Emit = Callable[[Y], None]


def stream(
    func: Callable[Concatenate[Emit[Y], ...], R],
    *args: Any,
    max_queue_size: int = 64,
    latest: bool = False,
    executor: concurrent.futures.Executor | None = None,
) -> Stream[Y, R]:
    """Run ``func(emit, *args)`` on a worker; read what it emits with ``async for``.

    ``async with tsfn.stream(func, *args) as items: async for item in items: ...``

    - ``emit(item)`` blocks while `max_queue_size` items wait (0: never), so the worker
      is never more than ``max_queue_size + 1`` items ahead of the consumer.
    - Leaving the block early, or cancelling the consuming task, makes the next
      ``emit`` raise `Closing` (and `tsfn.cancelled()` return True) in the worker; the
      block exits only after the worker has returned.
    - An exception raised by `func` is re-raised in the consumer after the items
      emitted before it; ``items.result`` holds `func`'s return value afterwards.
    - ``latest=True`` (progress reporting): ``emit`` never blocks, the consumer sees
      the newest item emitted since its last read, and the last item is always seen.

    `executor` must run `func` in this process (a thread pool); by default the loop's
    default executor.
    """
    return Stream(func, args, max_queue_size=max_queue_size, latest=latest, executor=executor)


class Stream(Generic[Y, R]):
    """The ``items`` of ``async with tsfn.stream(...) as items``: an async iterator."""

    def __init__(
        self,
        func: Callable[..., R],
        args: tuple[Any, ...],
        *,
        max_queue_size: int,
        latest: bool,
        executor: concurrent.futures.Executor | None,
    ) -> None:
        check_callable(func, "func", optional=False)
        check_count(max_queue_size, "max_queue_size", 0)
        if latest is not True and latest is not False:
            raise TypeError(f"latest must be a bool, got {latest!r}")
        if executor is not None and (
            not isinstance(executor, concurrent.futures.Executor)
            or isinstance(executor, concurrent.futures.ProcessPoolExecutor)
        ):
            raise TypeError(
                "executor must be a thread-based concurrent.futures.Executor or None "
                f"(emit cannot cross processes), got {executor!r}"
            )
        self._func = func
        self._args = args
        self._max_queue_size = max_queue_size
        self._latest = latest
        self._executor = executor
        self._flag = CancelFlag()
        self._fn: ThreadsafeFunction[Y] | None = None
        self._worker: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # the function's finalizer ran: nothing more will arrive
        self._seen_end = False  # the consumer got StopAsyncIteration or the error
        self._error: BaseException | None = None
        self._result: R | None = None
        # Queue mode: delivered items the consumer has not read (they keep their slots).
        self._buffer: deque[Y] = deque()
        # Latest mode: one slot the worker overwrites, and whether a wake-up is queued.
        self._slot_lock = threading.Lock()
        self._slot: Y | None = None
        self._slot_full = False
        self._signalled = False

    @property
    def result(self) -> R:
        """`func`'s return value, once iteration has ended without an error."""
        if not self._seen_end or self._error is not None:
            raise RuntimeError("items.result is available once the iteration has ended")
        return self._result  # type: ignore[return-value]

    # -- worker side -------------------------------------------------------------------

    def _run_worker(self) -> None:
        assert self._fn is not None
        emit = self._emit_latest if self._latest else self._fn.call
        try:
            self._result = run_with_flag(
                self._flag, functools.partial(self._func, emit, *self._args)
            )
        except BaseException as exc:  # re-raised in the consumer, after the items
            self._error = exc
        finally:
            self._fn.release()  # the last producer leaves: drain the rest, then end

    def _emit_latest(self, item: Y) -> None:
        assert self._fn is not None
        if self._fn.closing:
            raise Closing("the stream's consumer has gone")
        with self._slot_lock:
            self._slot = item
            self._slot_full = True
            if self._signalled:
                return  # a wake-up is already on its way; it will find this item
            self._signalled = True
        self._fn.call(None)  # type: ignore[arg-type]

    # -- loop side ---------------------------------------------------------------------

    def _on_item(self, item: Y) -> None:
        assert self._fn is not None
        if not self._latest:
            self._buffer.append(item)
        self._wake_consumer()

    def _on_end(self, _context: object) -> None:
        self._ended = True
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self) -> tuple[bool, Y | None]:
        if not self._latest:
            if not self._buffer:
                return False, None
            assert self._fn is not None
            self._fn._consumed()
            return True, self._buffer.popleft()
        with self._slot_lock:
            if not self._slot_full:
                return False, None
            latest = self._slot
            self._slot = None
            self._slot_full = self._signalled = False
            return True, latest

    def __aiter__(self) -> Stream[Y, R]:
        return self

    async def __anext__(self) -> Y:
        if self._fn is None:
            raise RuntimeError("iterate a stream inside its `async with` block")
        while True:
            got, item = self._take()
            if got:
                return item  # type: ignore[return-value]
            if self._ended:
                self._seen_end = True
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    async def __aenter__(self) -> Stream[Y, R]:
        if self._fn is not None:
            raise RuntimeError("a stream can be entered only once")
        loop = asyncio.get_running_loop()
        self._fn = ThreadsafeFunction(
            self._on_item,
            max_queue_size=0 if self._latest else self._max_queue_size,
            finalizer=self._on_end,
            name=f"stream({getattr(self._func, '__qualname__', '?')})",
        )
        self._fn._read_by_consumer()
        try:
            self._worker = loop.run_in_executor(self._executor, self._run_worker)
        except BaseException:
            self._fn.abort()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._fn is not None
        assert self._worker is not None
        if not self._seen_end:
            # The consumer leaves early: the worker's next emit raises Closing.
            self._flag.set()
            self._fn.abort()
        if isinstance(exc, GeneratorExit):
            # The consuming coroutine is being closed, not run (its loop was closed
            # under it): it cannot await. The worker was told to stop; it is not
            # waited for.
            return
        cancelled = await _join(self._worker)
        await _join(asyncio.ensure_future(self._fn.wait_closed()))
        if cancelled and exc is None:
            raise asyncio.CancelledError
        if exc is None and not self._seen_end and not isinstance(self._error, Closing | None):
            raise self._error  # the worker failed and the consumer never saw it


async def _join(future: asyncio.Future[Any]) -> bool:
    """Wait for `future` even through cancellation; return whether we were cancelled.

    The `async with` block promises to exit only after the worker has returned, so a
    cancelled consumer still waits (the worker has been told to stop).
    """
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    return cancelled
