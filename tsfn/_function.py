"""`ThreadsafeFunction`: Node-API's `napi_threadsafe_function` for asyncio.

The data path reads top to bottom in this module:

    call()      check closing, wait for room (bounded), append to the queue, then
                take the wake token if it is there
                -> loop.call_soon_threadsafe(_drain)     (once per batch, not per item)
    _drain()    on the loop thread: pop up to BATCH items (their slots are freed at
                once, so producers refill while the loop delivers)
                -> callback(data), or call_js(loop, callback, context, data)
    _settle()   reschedule, or put the wake token back and re-check the queue
    _finish()   once closing: leftovers to call_js(None, None, ctx, data) on abort,
                then the finalizer, exactly once

Locking. A bounded queue counts its slots under one `threading.Lock` (with a
Condition for callers waiting for room); counts and flags change under it too. An
unbounded queue needs no lock to append, and this is the hot path, so it takes none:
a lock that every producer takes convoys under the GIL (threads park on it while its
holder waits for the GIL: measured 3x slower with 4 producers; see benchmarks/). The
lock-free path relies on single-operation, hence atomic, calls: `deque.append` /
`deque.popleft` (the queue), and `list.append` / `list.pop` (the wake token and the
in-flight markers). Each is one C call: atomic under the GIL, and in free-threaded
CPython each runs inside its object's own critical section (PEP 703), so they stay
atomic there; two such sections on one object are totally ordered, which is what the
two hand-offs below need:

- The wake token is a list holding one `None` while no drain is pending. Producers
  append their item, then `pop` the token: exactly one wins and schedules the drain.
  The drain, when the queue looks empty, puts the token back *first* and *then*
  re-checks the queue, so an item appended meanwhile is seen by one side or the
  other: no lost wake-up (libuv's `uv_async_send` contract; Node's dispatch_state).
- An unbounded call marks itself in flight before it checks `closing` and unmarks
  after its append. Closing sets `closing` first, then waits until nothing is in
  flight before it finalizes, so no item can land in the queue after its last look.

No lock is ever held while user code (callback, call_js, finalizer) runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from ._checks import check_callable, check_count, check_name, check_timeout
from ._errors import Closing, QueueFull, WouldDeadlock
from ._loop import LoopPort, loop_or_running

__all__ = ["ThreadsafeFunction"]

T = TypeVar("T")

# Items delivered per loop iteration before the drain yields to other callbacks.
# Node's kMaxIterationCount: large enough to amortise the wake-up, small enough
# that timers and I/O still get a turn while producers flood the queue.
BATCH = 1000

# How often a caller blocked on a full queue checks whether the loop was closed
# directly with loop.close(), which nothing else can tell it (asyncio.run and
# friends do tell: see LoopPort's shutdown hook).
_CLOSED_LOOP_POLL = 0.1

Callback = Callable[[T], object]
CallJs = Callable[[asyncio.AbstractEventLoop | None, Callable[[T], object] | None, Any, T], object]


class _Submission(Generic[T]):
    """A queued item whose caller waits for the callback's result (`submit`)."""

    __slots__ = ("data", "future")

    def __init__(self, data: T, future: concurrent.futures.Future[Any]) -> None:
        self.data = data
        self.future = future


class _Lease:
    """Returned by `acquire()`: leaving the `with` block releases that producer."""

    __slots__ = ("_fn",)

    def __init__(self, fn: ThreadsafeFunction[Any]) -> None:
        self._fn = fn

    def __enter__(self) -> ThreadsafeFunction[Any]:
        return self._fn

    def __exit__(self, *exc_info: object) -> None:
        self._fn.release()


class ThreadsafeFunction(Generic[T]):
    """A function any thread may call; its callback runs on the event loop's thread.

    Worker threads hand items to `call` (or `submit`); the loop delivers each one to
    `callback(data)` (or `call_js(loop, callback, context, data)`) in the order each
    thread called, in batches, with one loop wake-up per batch.

    Producers are counted, as in Node-API: `initial_thread_count` at the start, one
    more per `acquire`, one fewer per `release`. When the count reaches zero the
    function closes: queued items are still delivered, then `finalizer(context)` runs.
    `abort` closes at once and hands queued items to `call_js(None, None, context,
    data)` instead.

    Guarantees: any call that does not raise is delivered to the callback or handed
    to `call_js` before the finalizer runs; the finalizer runs exactly once, on the
    loop thread, after every item; no user code ever runs inside `call`.
    """

    def __init__(
        self,
        callback: Callback[T] | None = None,
        *,
        call_js: CallJs[T] | None = None,
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Callable[[Any], object] | None = None,
        name: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        check_callable(callback, "callback")
        check_callable(call_js, "call_js")
        if callback is None and call_js is None:
            raise TypeError("ThreadsafeFunction needs a callback or call_js (both are None)")
        check_count(max_queue_size, "max_queue_size", 0)
        check_count(initial_thread_count, "initial_thread_count", 1)
        check_callable(finalizer, "finalizer")
        check_name(name)
        self._loop = loop_or_running(loop, "ThreadsafeFunction")
        self._port = LoopPort.of(self._loop)

        self._callback = callback
        self._call_js = call_js
        self._context = context
        self._finalizer = finalizer
        self._name = name
        self._max_queue_size = max_queue_size
        self._bounded = max_queue_size > 0
        # What a delivery calls: the callback itself, or call_js with its first three
        # arguments bound, so _deliver pays for no branch.
        self._invoke: Callable[[T], object] = (
            cast(Callable[[T], object], callback)
            if call_js is None
            else functools.partial(call_js, self._loop, callback, context)
        )
        self._call_soon_threadsafe = self._port.call_soon_threadsafe
        self._loop_is_closed = self._loop.is_closed  # on the hot path: no indirection

        # Shared with producer threads (see "Locking" above).
        self._queue: deque[T] = deque()  # producers append, only the loop pops
        self._wake_token: list[None] = [None]  # holds None while no drain is pending
        self._inflight: list[None] = []  # unbounded calls between checking and appending
        self._lock = threading.Lock()  # guards the counts and flags below
        self._not_full = threading.Condition(self._lock)
        self._slots = 0  # bounded: slots taken by queued items (and unread stream items)
        self._waiters = 0  # callers blocked in _wait_for_room
        self._threads = initial_thread_count
        self._closing = False  # written under _lock, read anywhere
        self._aborted = False  # written under _lock, read anywhere

        # Loop thread only.
        self._reader_frees_slots = False  # stream: slots are freed as its consumer reads
        self._referenced = True
        self._finalizing = False
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed_waiters: list[asyncio.Future[None]] = []

        self._port.hold()
        self._port.register(self)

    # -- producer side: any thread -----------------------------------------------------

    def call(self, data: T = None, *, block: bool = True, timeout: float | None = None) -> None:  # type: ignore[assignment]
        """Queue `data` for the callback; return once it is queued (not delivered).

        On a full bounded queue: with ``block=False`` raise `QueueFull` at once; with
        ``block=True`` wait for room, up to `timeout` seconds, then raise `QueueFull`.
        On the loop thread a call that would have to wait raises `WouldDeadlock`.
        Raises `Closing` once the function is closing; a caller waiting for room wakes
        with `Closing` too. Items from one thread are delivered in call order.
        """
        if block is not True and block is not False:
            raise TypeError(f"block must be a bool, got {block!r}")
        if timeout is not None:
            check_timeout(timeout)
        if self._bounded:
            self._put_bounded(data, block, timeout)
        else:
            if self._closing:  # refused without marking: see _wait_for_inflight
                raise self._closing_error()
            inflight = self._inflight
            inflight.append(None)
            try:
                if self._closing or self._loop_is_closed():
                    raise self._closing_error()
                self._queue.append(data)
            finally:
                inflight.pop()
        token = self._wake_token
        if token:  # no drain pending: try to be the one who schedules it
            try:
                token.pop()
            except IndexError:
                return  # another thread just did
            if not self._wake() and not self._finalizing:
                # The loop was closed under us. Had it shut down properly, the
                # function would have finalized, handing our item to call_js first;
                # it did not (a bare loop.close()): the item stays with the caller.
                raise self._closing_error()

    def _put_bounded(self, data: T, block: bool, timeout: float | None) -> None:
        with self._lock:
            if self._closing or self._loop_is_closed():
                raise self._closing_error()
            if self._slots >= self._max_queue_size:
                self._wait_for_room(block, timeout)
            self._queue.append(data)
            self._slots += 1

    def call_nowait(self, data: T = None) -> None:  # type: ignore[assignment]
        """`call(data, block=False)`: queue `data` or raise `QueueFull` at once."""
        self.call(data, block=False)

    def submit(
        self,
        data: T = None,  # type: ignore[assignment]
        *,
        block: bool = True,
        timeout: float | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Like `call`, and return a future for the callback's result.

        The future gets the callback's return value (awaited on the loop first if it
        is awaitable) or its exception. It is cancelled if the item is discarded by
        `abort` or loop shutdown. Cancelling it before delivery discards the item.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        # The queue holds plain items and submissions side by side, so one order holds
        # for both; _deliver tells them apart by type.
        self.call(cast(T, _Submission(data, future)), block=block, timeout=timeout)
        return future

    def acquire(self) -> contextlib.AbstractContextManager[ThreadsafeFunction[T]]:
        """Count one more producer; raise `Closing` if closing.

        The return value is a context manager whose exit calls `release()`:
        ``with fn.acquire(): ...``.
        """
        with self._lock:
            if self._closing or self._loop_is_closed():
                raise self._closing_error()
            self._threads += 1
        return _Lease(self)

    def release(self) -> None:
        """Count one producer fewer. At zero the function starts closing.

        Items already queued are still delivered, then the finalizer runs. Raises
        `Closing` if the count is already zero (released more than acquired).
        Allowed after `abort` while producers remain, as in Node-API.
        """
        with self._lock:
            if self._threads == 0:
                raise Closing(f"{self!r}: release() with no producer left to release")
            self._threads -= 1
            if self._threads or self._closing:
                return
            self._closing = True
            self._not_full.notify_all()
        # Wake the loop to deliver what is queued, then finalize.
        if self._wake_token:
            with contextlib.suppress(IndexError):
                self._wake_token.pop()
                self._wake()

    def abort(self) -> None:
        """Close now. Idempotent.

        Further calls, and every caller waiting for room, raise `Closing`. Items still
        queued are not given to the callback but to ``call_js(None, None, context,
        data)`` (when `call_js` was given), so what they hold can be released; then
        the finalizer runs, on the loop thread.
        """
        with self._lock:
            if self._aborted:
                return
            self._aborted = self._closing = True
            self._not_full.notify_all()
        # Always schedule: the drain that holds the wake token may be a paused one.
        self._wake()

    def _wake(self) -> bool:
        """Schedule a drain on the loop; False if the loop is closed."""
        try:
            self._call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop was closed under us
            self._lose_loop()
            return False
        return True

    def _wait_for_room(self, block: bool, timeout: float | None) -> None:
        # Called with _lock held, with the queue full; returns with room for one item.
        if not block or timeout == 0:
            raise QueueFull(f"{self!r}: the queue is full ({self._max_queue_size} items)")
        if self._port.on_loop_thread():
            raise WouldDeadlock(
                f"{self!r}: blocking call on the loop thread with the queue full; only "
                "this thread can make room. Use call_nowait() or call it from another thread."
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiters += 1
        try:
            while True:
                if self._closing:
                    raise self._closing_error()
                if self._loop_is_closed():
                    self._closing = True
                    self._not_full.notify_all()
                    raise self._closing_error()
                if self._slots < self._max_queue_size:
                    break
                wait = _CLOSED_LOOP_POLL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise QueueFull(
                            f"{self!r}: the queue stayed full for {timeout} s "
                            f"({self._max_queue_size} items)"
                        )
                self._not_full.wait(wait)
        except BaseException:
            # Leaving without a slot: pass on the wake-up this waiter may have taken.
            if self._waiters > 1:
                self._not_full.notify()
            raise
        finally:
            self._waiters -= 1
        # Wake-ups are handed on one at a time (a drain wakes one waiter; a woken
        # waiter wakes the next while room remains) rather than all at once: every
        # waiter still gets its turn, without a thundering herd of context switches.
        # (Node wakes one per pop and can strand waiters: nodejs/node#58723.)
        if self._waiters and self._slots + 1 < self._max_queue_size:
            self._not_full.notify()

    def _lose_loop(self) -> None:
        # The loop was closed directly (loop.close()): nothing will ever drain or
        # finalize, so close for callers; queued items stay undelivered (see docs).
        with self._lock:
            self._closing = True
            self._not_full.notify_all()

    def _closing_error(self) -> Closing:
        if self._loop_is_closed() and not self._finalizing:
            return Closing(f"{self!r}: its event loop is closed")
        return Closing(f"{self!r} is closing")

    # -- loop side ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Deliver up to BATCH queued items (loop thread; scheduled by the wake-up)."""
        if self._aborted:
            self._maybe_finish()
            return
        queue = self._queue
        count = min(len(queue), BATCH)  # only this thread pops: `count` items are there
        batch = None
        take = queue.popleft
        if self._bounded:
            # Take the batch out of the queue at once, and free its slots, so that
            # producers refill the queue while the loop delivers, and qsize() never
            # exceeds max_queue_size.
            batch = [take() for _ in range(count)]
            take = iter(batch).__next__
            if not self._reader_frees_slots:
                self._free_slots(count)
        invoke = self._invoke
        delivered = 0
        try:
            # The plain-item path is inlined: a method call per item would double
            # the drain's cost (see benchmarks/).
            for delivered in range(1, count + 1):  # noqa: B007 - used in finally
                item = take()
                if item.__class__ is _Submission:
                    self._deliver_submission(item)  # type: ignore[arg-type]
                else:
                    try:
                        result = invoke(item)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:
                        self._report("Exception in the callback", exc)
                    else:
                        if result is not None and isawaitable(result):
                            self._track(result, None)
                if self._aborted:
                    break
        finally:
            if batch is not None and delivered < count:
                self._put_back(batch[delivered:])
            self._settle()

    def _put_back(self, rest: list[T]) -> None:
        # An exception escaped a callback (KeyboardInterrupt, SystemExit) or abort()
        # stopped the batch: the rest goes back ahead of anything queued since, and
        # takes its slots back.
        with self._lock:
            self._queue.extendleft(reversed(rest))
            if not self._reader_frees_slots:
                self._slots += len(rest)

    def _settle(self) -> None:
        if self._aborted:
            self._maybe_finish()
        elif self._queue:
            # Keep the wake token: the next loop iteration drains on, after other
            # callbacks, timers and I/O have had their turn.
            self._port.call_soon(self._drain)
        else:
            # Put the token back first, then look again: an item appended since our
            # last look is either seen now or its producer finds the token.
            self._wake_token.append(None)
            if self._queue:
                with contextlib.suppress(IndexError):
                    self._wake_token.pop()
                    self._port.call_soon(self._drain)
            elif self._closing:
                self._maybe_finish()

    def _free_slots(self, count: int) -> None:
        """Give `count` slots back to producers of a bounded queue."""
        with self._lock:
            self._slots -= count
            if self._waiters and count:
                self._not_full.notify()  # one; it wakes the next (_wait_for_room)

    def _deliver_submission(self, item: _Submission[T]) -> None:
        future = item.future
        if future.cancelled():  # cancelled by its caller before delivery
            self._discard(item)
            return
        try:
            result = self._invoke(item.data)
        except (KeyboardInterrupt, SystemExit) as exc:
            _fail(future, exc)
            raise
        except BaseException as exc:
            _fail(future, exc)
            return
        if result is not None and isawaitable(result):
            self._track(result, future)
        else:
            _succeed(future, result)

    def _track(
        self, awaitable: Awaitable[Any], future: concurrent.futures.Future[Any] | None
    ) -> None:
        # An awaitable result runs as a task; its item counts as delivered once the
        # task is done, so the finalizer waits for it (and abort cancels it).
        task = asyncio.ensure_future(awaitable, loop=self._loop)
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, future))

    def _task_done(
        self, future: concurrent.futures.Future[Any] | None, task: asyncio.Future[Any]
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            if future is not None:
                future.cancel()
        elif (exc := task.exception()) is not None:
            if future is None:
                self._report("Exception in the callback", exc)
            else:
                _fail(future, exc)
        elif future is not None:
            _succeed(future, task.result())
        self._maybe_finish()

    def _report(self, what: str, exc: BaseException) -> None:
        self._port.report(f"{what} of {self!r}", exc, tsfn=self)

    def _discard(self, item: T | _Submission[T]) -> None:
        """Hand an undelivered item back to call_js(None, None, context, data)."""
        if isinstance(item, _Submission):
            item.future.cancel()
            item = item.data
        if self._call_js is None:
            return
        try:
            self._call_js(None, None, self._context, item)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._report("Exception in call_js discarding an item", exc)

    def _maybe_finish(self) -> None:
        """Finish if closing and nothing is left to deliver (or aborted)."""
        if not self._closing or self._finalizing:
            return
        self._wait_for_inflight()
        if self._aborted or not self._queue:
            self._finish()
        # Otherwise an item is queued, so a drain is pending: its _settle calls us.

    def _wait_for_inflight(self) -> None:
        # An unbounded call that saw `closing` unset may still be about to append; it
        # holds no lock and runs no user code, so this wait is a few instructions. Calls
        # made after `closing` was set are refused before they mark themselves, so
        # producers that keep calling cannot keep this wait going.
        while self._inflight:
            time.sleep(0)  # let it have the GIL

    def _finish(self, *, wait_for_tasks: bool = True) -> None:
        """Close on the loop thread: discard leftovers (abort), then the finalizer, once."""
        if self._finalizing:
            return
        if self._aborted:
            self._wait_for_inflight()
            queue = self._queue
            while queue:  # no producer appends any more: closing is set, none in flight
                self._discard(queue.popleft())
            for task in self._tasks:
                task.cancel()
        if self._tasks and wait_for_tasks:
            return  # the last task's _task_done calls us again
        self._finalizing = True
        self._port.unregister(self)
        if self._referenced:
            self._port.unhold()
        try:
            if self._finalizer is not None:
                self._finalizer(self._context)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self._report("Exception in the finalizer", exc)
        finally:
            self._closed = True
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _shutdown(self) -> None:
        # The loop is shutting down (LoopPort's hook, on the loop thread, loop still
        # running): abort and finalize now; there will be no later iteration to wait for.
        self.abort()
        self._finish(wait_for_tasks=False)

    def _read_by_consumer(self) -> None:
        """Stream: keep each delivered item's slot until `_consumed` frees it."""
        self._reader_frees_slots = True

    def _consumed(self) -> None:
        """Stream: its consumer has read one delivered item; free its slot."""
        if self._bounded:
            self._free_slots(1)

    # -- loop thread: liveness ---------------------------------------------------------

    def ref(self) -> None:
        """Keep `tsfn.run()` running until this function closes (the default).

        Like Node's `napi_ref_threadsafe_function`: idempotent, not counted. Loop
        thread only.
        """
        self._check_loop_thread("ref")
        if not self._referenced and not self._finalizing:
            self._referenced = True
            self._port.hold()

    def unref(self) -> None:
        """Let `tsfn.run()` finish while this function is open (it is then aborted).

        Idempotent, not counted. Loop thread only.
        """
        self._check_loop_thread("unref")
        if self._referenced:
            self._referenced = False
            if not self._finalizing:
                self._port.unhold()

    def _check_loop_thread(self, method: str) -> None:
        if not self._port.on_loop_thread():
            raise RuntimeError(f"{self!r}: {method}() must be called on its loop's thread")

    # -- state ---------------------------------------------------------------------------

    @property
    def context(self) -> Any:
        """The `context` object given at creation."""
        return self._context

    @property
    def name(self) -> str | None:
        """The `name` given at creation, or None."""
        return self._name

    @property
    def thread_count(self) -> int:
        """How many producers are counted now (acquired and not released)."""
        return self._threads

    @property
    def closing(self) -> bool:
        """True once no call can succeed: released to zero, aborted, or loop closed."""
        return self._closing or self._loop_is_closed()

    @property
    def closed(self) -> bool:
        """True once the finalizer has run."""
        return self._closed

    def qsize(self) -> int:
        """Items queued: accepted and not yet delivered (or discarded)."""
        return len(self._queue)

    async def wait_closed(self) -> None:
        """Return after the finalizer has run. Await it on the function's loop."""
        if self._closed:
            return
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(f"{self!r}: wait_closed() must be awaited on its own loop")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._closed_waiters.append(waiter)
        await waiter

    async def __aenter__(self) -> ThreadsafeFunction[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.abort()  # a failed body must not wait for producers that may never come
        await self.wait_closed()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._closing:
            state = "aborted" if self._aborted else "closing"
        else:
            state = "open"
        label = self._name or getattr(self._callback or self._call_js, "__qualname__", "?")
        return f"<ThreadsafeFunction {label!r} {state} threads={self._threads} queued={len(self._queue)}>"


def _succeed(future: concurrent.futures.Future[Any], result: object) -> None:
    # The caller may have cancelled the future meanwhile; that is its right.
    if not future.cancelled():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_result(result)


def _fail(future: concurrent.futures.Future[Any] | None, exc: BaseException) -> None:
    if future is not None and not future.cancelled():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_exception(exc)
