"""`ThreadsafeFunction`: Node-API's `napi_threadsafe_function`.

The data path reads top to bottom in this module:

    call()      refuse if closing; bounded: wait for room; append to the queue, then
                take the wake token if it is there
                -> port.call_soon_threadsafe(_drain)     (once per batch, not per item)
    _drain()    on the loop thread: pop up to BATCH items, one at a time
                -> callback(data), or call_js(loop, callback, context, data)
    _settle()   reschedule, or put the wake token back and re-check the queue
    _finish()   once closing: leftovers to call_js(None, None, ctx, data) on abort,
                then the finalizer, exactly once

The bound is Node's: an item frees its slot when the drain takes it to deliver it,
so at most `max_queue_size` items are accepted and not yet handed to the callback,
plus the one being delivered. Blocked producers are woken one at a time, once half
the queue is free (and at the end of each batch, if the one woken has run): one
wake-up per half queue, not per item (see `Lifecycle.room_made`). The
constructor's checks, state and liveness live in `_handle.py`; admission, producer
counting and closing in `_lifecycle.py`; the tasks and futures that deliveries leave
behind in `_results.py`; the event loop behind the port of `_loop.py`.

Locking. A bounded queue admits (waits for room, appends) under its lifecycle's
lock, and the drain puts the wake token back and looks at the queue again under it
too, so the lock orders each append against each look; the producer takes the token
only after releasing the lock. (asyncio's wake-up writes to a socket, which releases
the GIL: with the lock still held, every other producer and the drain queued behind
that write, 3x slower with 4 producers.) An append ordered after a look finds the
token put back (the lock's release and acquire order them, with or without the GIL);
one ordered before it is seen by the look. An unbounded queue with the GIL takes no
lock: the hot path, since a lock every producer takes convoys under the GIL (3x
slower with 4 producers; see benchmarks/). It relies
on single operations being atomic (`deque.append` / `popleft`, `list.append` / `pop`
for the wake token and the in-flight markers, one attribute read)
and on two hand-offs:

- The wake token is a list holding one `None` while no drain is pending. Producers
  append their item, then `pop` the token: one wins and schedules the drain. The
  drain, when the queue looks empty, puts the token back *first* and *then* re-checks
  the queue, so an item appended meanwhile is seen by one side or the other: no lost
  wake-up (libuv's `uv_async_send` contract). A producer interrupted while it holds
  the token schedules a drain anyway: an extra drain is harmless, only the loop
  thread puts the token back, and only when missing.
- An unbounded call marks itself in flight before it checks the state and unmarks
  after its append. Closing sets the state first, then waits until nothing is in flight
  before it finalizes, so no item can land in the queue after its last look.

Each is a store-then-load on two objects by each side (the store-buffer pattern), so
it needs one total order of both sides' operations. The GIL gives one. Free-threaded
CPython does not: per-object critical sections do not order two objects, and
`bool(list)` / `bool(set)` are relaxed loads (3.13's `PyList_GET_SIZE`, `set_len`), so a
weakly ordered CPU could show both sides stale values. Without the GIL, then, an
unbounded queue takes the locked path too.

Interrupts (KeyboardInterrupt, any asynchronous exception) can land between any two
operations; markers and token are taken inside `try` blocks that undo or complete
them. An in-flight marker is the first call inside its `try`: CPython raises a pending
interrupt only once a call has returned (or at a backward jump or a function's
start), never between entering a `try` and the end of its first call, so the marker
is either not taken or taken and removed. No lock is ever held while user code
(callback, call_js, finalizer) runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from ._checks import check_timeout
from ._handle import Finalizer, Handle, R, T
from ._lifecycle import Lifecycle, State
from ._loop import Membership, Port, let_through
from ._results import Results, Submission, SubmitFuture

__all__ = ["ThreadsafeFunction"]

# Items delivered per loop iteration before the drain yields to other callbacks.
# Node's kMaxIterationCount: large enough to amortise the wake-up, small enough
# that timers and I/O still get a turn while producers flood the queue.
BATCH = 1000

_OPEN, _ABORTED = State.OPEN, State.ABORTED
# Two, not one: CPython shrinks a list's storage once it is less than half full.
_PLACEHOLDERS = 2


class ThreadsafeFunction(Handle[T, R]):
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
    loop thread, after every item and after every awaitable a callback returned has
    finished; no user code ever runs inside `call`. At most `max_queue_size` items
    (when bounded) are accepted and not yet handed to the callback, plus the one being
    delivered.

    Typing: `ThreadsafeFunction[T, R]` takes items of type `T` and its `submit`
    futures hold `R`, what the callback (or `call_js`) returns, awaited if it is
    awaitable; `ThreadsafeFunction[T]` leaves `R` as `Any`.
    """

    def _setup(
        self,
        port: Port,
        callback: Callable[..., object] | None,
        call_js: Callable[..., object] | None,
        context: Any,
        max_queue_size: int,
        initial_thread_count: int,
        finalizer: Finalizer | None,
        name: str | None,
        reader: bool = False,
    ) -> None:
        # The constructor, after the argument checks. `reader` (for `stream`'s subclass):
        # delivered items wait for a reader, and keep their slots until it frees them.
        self._port = port
        self._callback = callback
        self._call_js = call_js
        self._context = context
        self._finalizer = finalizer
        self._name = name
        # What a delivery calls: the callback itself, or call_js with its first three
        # arguments bound, so the drain pays for no branch.
        self._invoke: Callable[[T], object] = (
            cast(Callable[[T], object], callback)
            if call_js is None
            else functools.partial(call_js, port.token, callback, context)
        )

        # Shared with producer threads (see "Locking" above).
        queue: deque[T] = deque()  # producers append, only the loop pops
        self._queue = queue
        self._wake_token: list[None] = [None]  # holds None while no drain is pending
        # Unbounded calls between check and append, one marker each after the two
        # placeholders: a list that never empties keeps its storage, where emptying it
        # would free and reallocate it on every call.
        self._inflight: list[None] = [None] * _PLACEHOLDERS
        self._life = Lifecycle(
            threads=initial_thread_count,
            max_size=max_queue_size,
            # With a reader, slots are counted: an item taken out of the queue to be
            # delivered to the reader must not look like a free slot on its way there.
            occupied=None if reader else queue.__len__,
            loop_closed=port.is_closed,
            on_loop_thread=port.on_loop_thread,
        )
        # The unlocked path: unbounded, and a GIL to order its two hand-offs (see above).
        self._lock_free = not max_queue_size and _gil_enabled()
        self._loop_closed = port.is_closed
        # What `call` admits without `admit`'s full checks: room below this length
        # (a stream's unread items take slots too: never).
        self._room = (0 if reader else max_queue_size) if max_queue_size else sys.maxsize
        # Bounded: the queue length at which a drain wakes blocked producers; with a
        # reader, a drain frees nothing (the reader does).
        self._low_water = max_queue_size // 2 if max_queue_size and not reader else -1

        # Loop thread only.
        self._results = Results(port)
        self._finalizing = False
        self._closed = False
        self._closed_event = None  # made by the first wait_closed()
        port.join(self)  # hands us our membership: _joined

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
            timeout = check_timeout(timeout)
        life = self._life
        if not self._lock_free:
            # Room, and open: append under the lock right here. Anything else (a full
            # queue, closing, a stream's reader holding slots) goes to `admit`, which
            # takes the lock again and looks again. The method call, with its bound
            # `append`, cost more than the lock: 780 ns a bounded call against 250 ns
            # an unbounded one before, see benchmarks/.
            queue = self._queue
            with life.lock:
                admitted = life.open and len(queue) < self._room and not self._loop_closed()
                if admitted:
                    queue.append(data)
            if not admitted:
                life.admit(self, queue.append, data, block, timeout)
        else:
            if not life.open:  # refused without marking: see _wait_for_inflight
                raise life.closing_error(self)
            inflight = self._inflight
            try:
                inflight.append(None)  # first inside the try: see "Interrupts" above
                if not life.open or self._loop_closed():
                    raise life.closing_error(self)
                self._queue.append(data)
            finally:
                inflight.pop()
        # Outside the lock (see "Locking" above).
        if not self._wake_token or self._wake():
            return
        life.lose_loop()
        if not self._finalizing:
            # The loop was closed under us. Had it shut down properly, the function
            # would have finalized, handing our item to call_js first; it did not (a
            # bare loop.close()): the item stays with the caller.
            raise life.closing_error(self)

    def call_nowait(self, data: T = None) -> None:  # type: ignore[assignment]
        """`call(data, block=False)`: queue `data` or raise `QueueFull` at once."""
        self.call(data, block=False)

    def submit(
        self,
        data: T = None,  # type: ignore[assignment]
        *,
        block: bool = True,
        timeout: float | None = None,
    ) -> concurrent.futures.Future[R]:
        """Like `call`, and return a future for the callback's result.

        The future gets the callback's return value (awaited on the loop first if it
        is awaitable) or its exception. It is cancelled if the item is discarded by
        `abort` or loop shutdown. Cancelling it while the item waits in the queue
        discards the item; while the callback runs, `cancel()` returns False; once an
        async callback's task runs, cancelling the future cancels the task (as
        `asyncio.run_coroutine_threadsafe` does).
        """
        future: SubmitFuture[R] = SubmitFuture()
        # The queue holds plain items and submissions side by side, so one order holds
        # for both; the drain tells them apart by type.
        self.call(cast(T, Submission(data, future)), block=block, timeout=timeout)
        return future

    def _wake(self) -> bool:
        """Schedule a drain unless one is pending; False if the loop is closed."""
        token = self._wake_token
        try:
            token.pop()
            self._port.call_soon_threadsafe(self._drain)
        except IndexError:
            pass  # the token was taken: that drain will look at the queue and state
        except RuntimeError:  # a bare loop.close(): nothing will drain or finalize
            return False
        except BaseException:
            # Interrupted holding the token: schedule anyway (an extra drain is
            # harmless, a missing one would strand every later item), then go on.
            with contextlib.suppress(RuntimeError):
                self._port.call_soon_threadsafe(self._drain)
            raise
        return True

    # -- loop side ---------------------------------------------------------------------

    def _drain(self) -> None:
        """Deliver up to BATCH queued items (loop thread; scheduled by the wake-up)."""
        life = self._life
        if life.state is _ABORTED:
            self._maybe_finish()
            return
        queue = self._queue
        take = queue.popleft
        invoke = self._invoke
        low = self._low_water
        # Locals, not globals, in the loop below (a global lookup per item shows).
        submission = Submission
        try:
            # The plain-item path is inlined: a method call per item would double
            # the drain's cost (see benchmarks/).
            # Not min(): on 3.11 it parses its arguments as keywords, a few hundred
            # instructions per drain.
            count = len(queue)
            for _ in range(count if count < BATCH else BATCH):  # only this thread pops
                item = take()
                if life.waiters and len(queue) <= low:
                    low = -1  # once a batch; _settle covers the rest
                    life.room_made()
                if item.__class__ is submission:
                    if not self._results.deliver(self, item):
                        self._discard(item.data)
                else:
                    try:
                        result = invoke(item)
                    except BaseException as exc:
                        if let_through(exc):
                            raise
                        self._report("Exception in the callback", exc)
                    else:
                        if result is not None:
                            self._results.returned(self, result, None)
                if life.aborted:
                    break
        finally:
            self._settle()

    def _settle(self) -> None:
        life = self._life
        if life.max_size:
            life.room_made()  # under the lock, so a producer about to wait is seen
        queue = self._queue
        if life.state is _ABORTED:
            self._maybe_finish()
        elif queue:
            # Keep the wake token: the next loop iteration drains on, after other
            # callbacks, timers and I/O have had their turn.
            self._port.call_soon(self._drain)
        else:
            # Put the token back first, then look again: an item appended since our
            # last look is either seen now or its producer finds the token. Under the
            # lock that locked producers take the token under (see "Locking").
            token = self._wake_token
            with life.lock:
                if not token:
                    token.append(None)
                if queue:
                    try:
                        token.pop()
                    except IndexError:
                        return  # a producer took it back: it schedules the drain
                    self._port.call_soon(self._drain)
                    return
            if life.state is not _OPEN:
                self._maybe_finish()

    def _report(self, what: str, exc: BaseException) -> None:
        self._port.report(f"{what} of {self!r}", exc, tsfn=self)

    def _discard(self, item: Any) -> None:
        """Hand an undelivered item back to call_js(None, None, context, data)."""
        if item.__class__ is Submission:
            item.future.cancel()
            item = item.data
        if self._call_js is None:
            return
        try:
            result = self._call_js(None, None, self._context, item)
        except BaseException as exc:
            self._port.fault(f"Exception in call_js discarding an item of {self!r}", exc, tsfn=self)
        else:
            if result is not None:
                self._results.returned(self, result, None)  # an async call_js runs to its end

    def _maybe_finish(self) -> None:
        """Finish if closing and nothing is left to deliver (or aborted)."""
        life = self._life
        if life.state is _OPEN or self._finalizing:
            return
        self._wait_for_inflight()
        if life.state is _ABORTED:
            self._results.cancel_all()  # first: the cleanups of discards below run on
            queue = self._queue
            try:
                while queue:  # no producer appends any more: aborted, none in flight
                    self._discard(queue.popleft())
            except BaseException:  # call_js's interrupt (Port.interrupted): the rest next run
                self._port.call_soon(self._drain)
                raise
        elif self._queue:
            return  # a drain is pending: its _settle calls us again
        if not self._results.tasks:
            self._finish()
        # Otherwise the last task to end calls us again.

    def _wait_for_inflight(self) -> None:
        # An unbounded call that saw the function open may still be about to append;
        # it holds no lock and runs no user code, so this wait is a few instructions.
        # Calls made after closing began are refused before they mark themselves, so
        # producers that keep calling cannot keep this wait going.
        while len(self._inflight) > _PLACEHOLDERS:
            time.sleep(0)  # let it have the GIL

    def _finish(self) -> None:
        """Run the finalizer, once; then the function is closed."""
        self._finalizing = True
        self._membership.leave()
        try:
            if self._finalizer is not None:
                self._finalizer(self._context)
        except BaseException as exc:
            self._port.fault(f"Exception in the finalizer of {self!r}", exc, tsfn=self)
        finally:
            self._mark_closed()

    # The loop's shutdown (see _loop.Member): on the loop thread, loop still running.

    def _joined(self, membership: Membership) -> None:
        self._membership = membership

    def _shutdown(self) -> None:
        self.abort()
        self._maybe_finish()

    async def _finished(self) -> None:
        await self.wait_closed()


def _gil_enabled() -> bool:
    # Free-threaded builds (3.13t) can run with or without the GIL: ask.
    is_enabled: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return is_enabled is None or is_enabled()
