"""`tsfn.stream`: node-addon-api's AsyncProgressQueueWorker / AsyncProgressWorker.

A function runs on a worker and `emit`s items; the loop side reads them with
`async for`. Underneath is one ThreadsafeFunction whose single producer is the
worker: `emit` is a blocking `call`, the worker's return is its `release`, and the
finalizer marks the end of the stream, so every item emitted before the end (or
before an exception) is read first.

Backpressure counts every buffer: a delivered item keeps its slot in the function's
bounded queue until the consumer has read it (`_ReaderBound`), so the queue and the
stream's buffer together hold at most `max_queue_size` items, and the worker is never
more than `max_queue_size + 1` items ahead (the `+ 1` is the item in its hand). The
slot is freed once the consumer holds the item, as `__anext__` returns it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, Generic, NoReturn, TypeVar

from ._cancel import CancelFlag, run_with_flag
from ._checks import check_callable, check_count
from ._errors import Closing
from ._function import ThreadsafeFunction
from ._loop import Event, Port, Spawned
from ._relay import DaskClient, RemoteStream, executor_of
from ._running import running_port

__all__ = ["Stream", "stream"]

Y = TypeVar("Y")
R = TypeVar("R")

Emit = Callable[[Y], None]


def stream(
    func: Callable[Concatenate[Emit[Y], ...], R],
    *args: Any,
    max_queue_size: int = 64,
    latest: bool = False,
    executor: concurrent.futures.Executor | DaskClient | None = None,
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

    A stream is iterated once: after its end, a new ``async for`` raises RuntimeError.
    `executor`: by default the loop's default executor; a thread pool; or, with the
    same guarantees, a process pool or a Dask `distributed.Client` (or its
    ``get_executor()``), where `func`, `args`, the items and the result must pickle.
    """
    return Stream(func, args, max_queue_size=max_queue_size, latest=latest, executor=executor)


class _ReaderBound(ThreadsafeFunction[Y, None]):
    """A function whose delivered items stay counted until their reader takes them.

    `callback` moves each item into the reader's buffer, and the reader calls
    `read_one` after taking one out of it, so the queue and the buffer together hold
    at most `max_queue_size` items. (The stream has checked the arguments.)
    """

    def __init__(
        self,
        callback: Callable[[Y], object],
        *,
        max_queue_size: int,
        finalizer: Callable[[Any], object],
        name: str,
    ) -> None:
        port = running_port("stream")
        self._setup(port, callback, None, None, max_queue_size, 1, finalizer, name, reader=True)

    def read_one(self) -> None:
        """The reader took an item out of its buffer: its slot is free. Loop thread."""
        self._life.read_one()


class _Queued(Generic[Y]):
    """Every item, in order, through the reader-bound function's queue.

    `remote`: the items come from another process, in lists handed to `deliver` on
    the loop thread; the function only ends the stream, and the credits are the
    bound (see _relay.py).
    """

    def __init__(
        self,
        wake: Callable[[], None],
        max_queue_size: int,
        end: Callable[[Any], None],
        name: str,
        *,
        remote: bool = False,
    ) -> None:
        self._buffer: deque[Y] = deque()  # delivered, unread: they keep their slots
        self._wake = wake
        self.fn = _ReaderBound(
            self._on_item,
            max_queue_size=0 if remote else max_queue_size,
            finalizer=end,
            name=name,
        )
        # Called for each item read: frees its slot, or gives a remote credit back.
        self.on_read: Callable[[], None] = _nothing if remote else self.fn.read_one
        self.emit: Callable[[Any], None] = self.fn.call

    def _on_item(self, item: Y) -> None:
        self._buffer.append(item)
        self._wake()

    def deliver(self, batch: list[Y]) -> None:
        self._buffer.extend(batch)
        self._wake()

    def take(self) -> tuple[bool, Y | None]:
        if not self._buffer:
            return False, None
        item = self._buffer.popleft()
        self.on_read()
        return True, item


def _nothing() -> None:
    pass


class _Latest(Generic[Y]):
    """The newest item only: one slot the worker overwrites, and one wake-up queued."""

    def __init__(self, wake: Callable[[], None], end: Callable[[Any], None], name: str) -> None:
        self._lock = threading.Lock()
        self._slot: Y | None = None
        self._full = False
        self._signalled = False  # a wake-up is queued; it will find the newest item
        self._wake = wake
        self.on_read: Callable[[], None] = _nothing  # a remote credit back, per item read
        self.fn: ThreadsafeFunction[None] = ThreadsafeFunction(
            lambda _: wake(), finalizer=end, name=name
        )

    def emit(self, item: Y) -> None:
        if self.fn.closing:
            raise Closing("the stream's consumer has gone")
        with self._lock:
            self._slot = item
            self._full = True
            if self._signalled:
                return
            self._signalled = True
        self.fn.call(None)

    def deliver(self, batch: list[Y]) -> None:
        # On the loop thread, where nobody reads between the items: the last counts.
        with self._lock:
            self._slot = batch[-1]
            self._full = True
        self._wake()

    def take(self) -> tuple[bool, Y | None]:
        with self._lock:
            if not self._full:
                return False, None
            item, self._slot = self._slot, None
            self._full = self._signalled = False
        self.on_read()
        return True, item


class Stream(Generic[Y, R]):
    """The ``items`` of ``async with tsfn.stream(...) as items``: an async iterator."""

    def __init__(
        self,
        func: Callable[..., R],
        args: tuple[Any, ...],
        *,
        max_queue_size: int,
        latest: bool,
        executor: concurrent.futures.Executor | DaskClient | None,
    ) -> None:
        check_callable(func, "func", optional=False)
        check_count(max_queue_size, "max_queue_size", 0)
        if latest is not True and latest is not False:
            raise TypeError(f"latest must be a bool, got {latest!r}")
        self._executor, self._host = executor_of(executor)
        self._func = func
        self._args = args
        self._max_queue_size = max_queue_size
        self._latest = latest
        self._remote: RemoteStream | None = None  # func runs in another process
        self._started = False  # _run_worker began, in this process
        self._flag = CancelFlag()
        self._port: Port | None = None
        self._items: _Queued[Y] | _Latest[Y] | None = None
        self._take: Callable[[], tuple[bool, Y | None]] = lambda: (False, None)
        self._worker: Spawned[None] | None = None
        self._waiter: Event | None = None
        self._ended = False  # the function's finalizer ran: nothing more will arrive
        self._seen_end = False  # the consumer got StopAsyncIteration or the error
        self._error: BaseException | None = None
        self._result: R | None = None

    @property
    def result(self) -> R:
        """`func`'s return value, once iteration has ended without an error."""
        if not self._seen_end or self._error is not None:
            raise RuntimeError("items.result is available once the iteration has ended")
        return self._result  # type: ignore[return-value]

    # -- worker side -------------------------------------------------------------------

    def _run_worker(self, body: Callable[[], R] | None = None) -> None:
        # `body`: for a remote function, its relay, which returns or raises its outcome.
        assert self._items is not None
        self._started = True
        try:
            self._result = (
                body()
                if body is not None
                else run_with_flag(
                    self._flag, functools.partial(self._func, self._items.emit, *self._args)
                )
            )
        except BaseException as exc:  # re-raised in the consumer, after the items
            self._error = _reraisable(exc)
        finally:
            self._items.fn.release()  # the last producer leaves: drain the rest, then end

    def _unless_run(self, job: concurrent.futures.Future[None]) -> None:
        # Any thread. A job an executor cancelled (shut down with `cancel_futures`) or
        # failed to send (it pickles jobs: see __reduce__) never ran _run_worker, so
        # nothing would release the function: end the stream with the executor's error.
        if self._started:
            return
        assert self._items is not None
        self._error = (
            job.exception() if not job.cancelled() else concurrent.futures.CancelledError()
        ) or RuntimeError(f"{self._executor!r} reported the stream's job done but never ran it")
        self._items.fn.release()

    def __reduce__(self) -> NoReturn:
        # An executor that pickles its jobs runs them in another process, where the
        # items would go to a copy of this stream: refuse, so that the stream ends with
        # this error instead of waiting for items that never come.
        raise TypeError(
            f"tsfn.stream cannot send its worker through {self._executor!r}: it pickles "
            "its jobs to run them in another process; tsfn crosses processes with a "
            "concurrent.futures.ProcessPoolExecutor or a Dask distributed.Client"
        )

    # -- loop side ---------------------------------------------------------------------

    def _on_end(self, _context: object) -> None:
        self._ended = True
        if self._remote is not None:
            self._remote.detach()  # aborted: the remote emit raises Closing (no-op at the end)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        if self._waiter is not None:
            self._waiter.set()

    def __aiter__(self) -> Stream[Y, R]:
        if self._seen_end:
            raise RuntimeError("this stream has ended; a stream can be iterated only once")
        return self

    async def __anext__(self) -> Y:
        if self._items is None or self._port is None:
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
            if self._remote is not None and self._remote.pull():
                continue
            self._waiter = self._port.event()
            await self._waiter.wait()

    async def __aenter__(self) -> Stream[Y, R]:
        if self._items is not None:
            raise RuntimeError("a stream can be entered only once")
        self._port = port = running_port("stream")
        name = f"stream({getattr(self._func, '__qualname__', '?')})"
        self._items = (
            _Latest(self._wake_consumer, self._on_end, name)
            if self._latest
            else _Queued(
                self._wake_consumer,
                self._max_queue_size,
                self._on_end,
                name,
                remote=self._host is not None,
            )
        )
        self._take = self._items.take
        try:
            if self._executor is None:
                self._worker = port.run_in_worker(self._run_worker)
            elif self._host is None:
                job = self._executor.submit(self._run_worker)
                job.add_done_callback(self._unless_run)
                self._worker = port.wrap_future(job)
            else:
                self._worker = port.wrap_future(self._start_remote(self._executor, self._host))
        except BaseException:
            self._items.fn.abort()
            raise
        return self

    def _start_remote(
        self, executor: concurrent.futures.Executor, host: str
    ) -> concurrent.futures.Future[None]:
        assert self._items is not None
        assert self._port is not None
        self._remote = remote = RemoteStream(
            host,
            self._port,
            self._items.deliver,
            self._run_worker,
            self._max_queue_size,
            self._latest,
        )
        if remote.credited:
            self._items.on_read = remote.credit_one
        return remote.start(executor, self._func, self._args, self._max_queue_size, self._latest)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._items is not None
        assert self._port is not None
        assert self._worker is not None
        fn = self._items.fn
        if not self._seen_end:
            # The consumer leaves early: the worker's next emit raises Closing.
            self._flag.set()
            fn.abort()
        if isinstance(exc, GeneratorExit):
            # The consuming coroutine is being closed, not run (its loop was closed
            # under it): it cannot await. The worker was told to stop; it is not
            # waited for.
            return
        # The block promises to exit only after the worker has returned, so a
        # cancelled consumer still waits (the worker has been told to stop).
        cancelled = await self._port.join_uncancellable(self._join(fn))
        if cancelled and exc is None:
            await self._port.raise_cancelled()
        if exc is None and not self._seen_end and not isinstance(self._error, Closing | None):
            raise self._error  # the worker failed and the consumer never saw it

    async def _join(self, fn: ThreadsafeFunction[Any, Any]) -> None:
        assert self._worker is not None
        await self._worker  # its outcome went to self._error
        await fn.wait_closed()


def _reraisable(exc: BaseException) -> BaseException:
    """`exc`, or a RuntimeError from it if re-raising it would end an iteration.

    `__anext__` raising StopAsyncIteration (or StopIteration, inside a coroutine)
    would end the consumer's `async for` as if the stream had ended: as PEP 479 does
    for generators, it becomes a RuntimeError whose cause is the original.
    """
    if isinstance(exc, (StopIteration, StopAsyncIteration)):
        error = RuntimeError(f"the stream's function raised {type(exc).__name__}")
        error.__cause__ = exc
        return error
    return exc
