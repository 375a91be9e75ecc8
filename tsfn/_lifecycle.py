"""Admission and lifecycle of a ThreadsafeFunction: producers, slots, closing.

One lock guards it all: the producer count (`acquire` / `release`), the
closing state, and, for a bounded queue, admission (room for one more item) with a
`Condition` for callers waiting for room. Producers of an unbounded queue never take
the lock: they read `state` without it (see `_function.py`'s docstring).

The state only moves forward, OPEN -> CLOSING (released to zero: deliver what is
queued, then finalize) or -> ABORTED (`abort()`, or the loop shut down: discard what
is queued), and CLOSING -> ABORTED. Every move wakes every caller waiting for room.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

from ._errors import Closing, QueueFull, WouldDeadlock

__all__ = ["Lifecycle", "State"]

# How often a caller blocked on a full queue checks whether the loop was closed
# directly with loop.close(), which nothing else can tell it (asyncio.run and
# friends do tell: see the ports' shutdown hooks).
CLOSED_LOOP_POLL = 0.1


class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    ABORTED = "aborted"


class Lifecycle:
    """Producers, slots and the closing state of one function."""

    __slots__ = (
        "_counted",
        "_loop_closed",
        "_not_full",
        "_occupied",
        "_on_loop_thread",
        "aborted",
        "held",
        "lock",
        "max_size",
        "open",
        "state",
        "threads",
        "waiters",
        "woken",
    )

    def __init__(
        self,
        *,
        threads: int,
        max_size: int,
        occupied: Callable[[], int] | None,
        loop_closed: Callable[[], bool],
        on_loop_thread: Callable[[], bool],
    ) -> None:
        self.lock = threading.Lock()
        self._not_full = threading.Condition(self.lock)
        self.state = State.OPEN  # written under the lock, read anywhere
        # The state as the hot paths test it, one attribute load each (call, the drain):
        # set with it, in `_close`.
        self.open = True
        self.aborted = False
        self.threads = threads
        self.waiters = 0  # callers blocked in _wait_for_room
        self.woken = 0  # of those, woken by room_made and not yet back (at most this)
        self.max_size = max_size  # 0: unbounded
        # Slots taken, what the bound counts: the queue's length, or (None) the items
        # admitted and not yet freed by `read_one`, counted here.
        self.held = 0
        self._counted = occupied is None
        self._occupied = occupied or self._held
        self._loop_closed = loop_closed
        self._on_loop_thread = on_loop_thread

    # -- refusing ----------------------------------------------------------------------

    # `who` is the function, for error messages: the lifecycle keeps no reference to
    # it, so that a dropped function is freed by reference counting alone.

    def refuse_if_closing(self, who: object) -> None:
        """Raise `Closing` unless open (and the loop not closed under us)."""
        if self.state is not State.OPEN or self._loop_closed():
            raise self.closing_error(who)

    def closing_error(self, who: object) -> Closing:
        if self._loop_closed():
            return Closing(f"{who!r}: its event loop is closed")
        return Closing(f"{who!r} is closing")

    def _close(self, state: State) -> None:
        # Under the lock: the one place the state moves.
        self.state = state
        self.open = False
        self.aborted = state is State.ABORTED
        self._not_full.notify_all()

    # -- producers ---------------------------------------------------------------------

    def acquire(self, who: object) -> None:
        with self.lock:
            self.refuse_if_closing(who)
            self.threads += 1

    def release(self, who: object) -> bool:
        """One producer fewer; True if this release began closing."""
        with self.lock:
            if self.threads == 0:
                raise Closing(f"{who!r}: release() with no producer left to release")
            self.threads -= 1
            if self.threads or self.state is not State.OPEN:
                return False
            self._close(State.CLOSING)
            return True

    def abort(self) -> bool:
        """Close now, discarding; True the first time."""
        with self.lock:
            if self.state is State.ABORTED:
                return False
            self._close(State.ABORTED)
            return True

    def lose_loop(self) -> None:
        """The loop was closed directly: nothing will drain any more."""
        with self.lock:
            if self.state is State.OPEN:
                self._close(State.CLOSING)

    # -- a bounded queue's slots ---------------------------------------------------------

    def admit(
        self,
        who: object,
        append: Callable[[Any], object],
        data: Any,
        block: bool,
        timeout: float | None,
    ) -> None:
        """`append(data)` under the lock, once there is room.

        See `ThreadsafeFunction.call`; an unbounded queue (`max_size` 0) never waits.
        """
        with self.lock:
            if not self.open or self._loop_closed():
                raise self.closing_error(who)
            if self.max_size and self._occupied() >= self.max_size:
                self._wait_for_room(who, block, timeout)
            if self._counted:
                self.held += 1  # before the append: an interrupt between errs short
            append(data)

    def _wait_for_room(self, who: object, block: bool, timeout: float | None) -> None:
        # With the lock held and no room; returns with room for one item.
        if not block or timeout == 0:
            raise QueueFull(f"{who!r}: the queue is full ({self.max_size} items)")
        if self._on_loop_thread():
            raise WouldDeadlock(
                f"{who!r}: blocking call on the loop thread with the queue full; "
                "only this thread can make room. Use call_nowait() or call it from another "
                "thread."
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        self.waiters += 1
        try:
            while True:
                if self._loop_closed() and self.state is State.OPEN:
                    self._close(State.CLOSING)
                self.refuse_if_closing(who)
                if self._occupied() < self.max_size:
                    break
                wait = CLOSED_LOOP_POLL
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise QueueFull(
                            f"{who!r}: the queue stayed full for {timeout} s "
                            f"({self.max_size} items)"
                        )
                try:
                    self._not_full.wait(wait)
                finally:
                    # Any return counts as the woken one's (a timed-out poll may be
                    # counted instead): `woken` may fall short, so an extra wake-up
                    # can happen. Over (an interrupt right here) it stays only until
                    # the next poll of any waiter.
                    if self.woken:
                        self.woken -= 1
        except BaseException:
            # Leaving without a slot: pass on the wake-up this waiter may have taken.
            if self.waiters > 1:
                self._not_full.notify()
            raise
        finally:
            self.waiters -= 1

    def _held(self) -> int:
        return self.held

    def read_one(self) -> None:
        """A reader took an admitted item: its slot is free (counted slots only)."""
        with self.lock:
            self.held -= 1
        self.room_made()

    def room_made(self) -> None:
        """Slots were freed: wake one waiter if there is room.

        One at a time, and a woken waiter wakes nobody: under the GIL the one woken
        keeps the GIL while it calls again and fills the room itself, so a second
        waiter woken beside it finds the queue full and parks again, a wasted thread
        switch per wake-up (chaining wake-ups cost 1.5x the switches per item with 4
        producers, see benchmarks/). No waiter is stranded: the woken one's item, or
        the one before it, is still queued, and the drain that takes it calls this
        again (as the reader of a `stream` does for each item it reads). While one
        woken waiter has not run yet (the drain that woke it at half queue still holds
        the GIL), the end of the batch wakes no second one. (Node wakes one per pop and
        can strand waiters: nodejs/node#58723.)
        """
        with self.lock:
            if self.waiters and not self.woken and self._occupied() < self.max_size:
                self.woken += 1
                self._not_full.notify()
