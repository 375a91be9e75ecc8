"""The event-loop seam: the only place that knows which event loop is running.

Everything tsfn asks of an event loop goes through a `Port`: schedule a callback
from any thread, tell whether this thread runs the loop, report an exception the way
the loop reports its own, make events to await, spawn a task for an awaitable
result, run a function on a worker, watch a socket, and learn that the loop is
shutting down. Each
loop family implements those primitives once (`_asyncio.py`, which asyncio's default
loop and uvloop share, and `_trio.py`; `_running.py` finds the running one); what is
the same for every loop lives here: membership and liveness.

*Membership*: each ThreadsafeFunction and each queued AsyncWork `join`s the port of
its loop and gets a `Membership`. While it is a member, the loop's shutdown shuts it
down (abort, discard, finalizer) before the loop closes. While it is *referenced*
(Node's `uv_ref`), it keeps `tsfn.run` running. `leave()` ends both.
"""

from __future__ import annotations

import abc
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ClassVar, NoReturn, Protocol, TypeVar

__all__ = ["Event", "Member", "Membership", "Port", "Spawned"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def let_through(exc: BaseException) -> bool:
    """True for the exceptions that are requests to stop, not faults to report."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit))


class Member(Protocol):
    """Something that must be shut down on the loop thread before its loop closes."""

    def _joined(self, membership: Membership) -> None:
        """Keep `membership`. `Port.join` calls this before anything can call
        `_shutdown`: the loop thread may run a late member's shutdown before `join`
        has returned to the thread that joined."""

    def _shutdown(self) -> None:
        """Stop now (loop thread, loop still running): abort, start finishing."""

    async def _finished(self) -> None:
        """Return once finished (finalizer or `complete` run). Awaited at shutdown."""


class Event(Protocol):
    """A one-shot event of the loop: `set` on the loop thread, awaited there."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class Spawned(Protocol[R_co]):
    """What `Port.spawn` and `Port.run_in_worker` return: a future of the loop."""

    def cancel(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def done(self) -> bool: ...

    def result(self) -> R_co: ...

    def exception(self) -> BaseException | None: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...

    def __await__(self) -> Generator[Any, None, R_co]: ...


class Membership:
    """A member's place in its loop (see the module docstring). Any thread."""

    __slots__ = ("_member", "_port", "referenced")

    def __init__(self, port: Port, member: Member) -> None:
        self._port = port
        self._member: Member | None = member
        self.referenced = True

    def ref(self) -> None:
        """Keep `tsfn.run` running (idempotent). Ignored once left."""
        if not self.referenced and self._member is not None:
            self.referenced = True
            self._port._hold(+1)

    def unref(self) -> None:
        """Stop keeping `tsfn.run` running (idempotent)."""
        if self.referenced:
            self.referenced = False
            if self._member is not None:
                self._port._hold(-1)

    def leave(self) -> None:
        """The member is finished: no shutdown call, no hold. Idempotent."""
        member, self._member = self._member, None
        if member is not None:
            self._port._leave(member, self.referenced)


class Port(abc.ABC):
    """One per running event loop: the primitives below, plus membership."""

    # Ports with members, held strongly: a member nobody refers to any more must still
    # be shut down (its finalizer run) with its loop.
    _busy: ClassVar[set[Port]] = set()
    _busy_lock = threading.Lock()

    def __init__(self) -> None:
        # Guards `_members`, `_referenced`, `_shut_down`: members join from any thread.
        self._lock = threading.Lock()
        self._members: set[Member] = set()
        self._referenced = 0
        self._shut_down = False
        self._idle: Event | None = None  # created on the loop thread by wait_idle
        # Loop thread only: while shutdown() shuts the members down, the first interrupt
        # their code raised (see interrupted()).
        self._shutting_down = False
        self._interrupt: BaseException | None = None

    # -- primitives, one implementation per loop family --------------------------------

    @property
    @abc.abstractmethod
    def token(self) -> Any:
        """What `call_js` gets as its first argument: the asyncio loop, or trio's token."""

    @abc.abstractmethod
    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run `callback()` soon on the loop thread. Any thread. Raises RuntimeError
        once the loop is closed."""

    @abc.abstractmethod
    def call_soon(self, callback: Callable[[], object]) -> None:
        """The same, from the loop thread, after the callbacks already due."""

    @abc.abstractmethod
    def on_loop_thread(self) -> bool:
        """True when the calling thread is running this loop."""

    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the loop can run nothing any more."""

    @abc.abstractmethod
    def report(self, message: str, exc: BaseException, **extra: Any) -> None:
        """Hand `exc` to the loop's handler for unhandled errors of callbacks."""

    @abc.abstractmethod
    def event(self) -> Event:
        """A new one-shot event. Loop thread."""

    @abc.abstractmethod
    def spawn(self, awaitable: Awaitable[R]) -> Spawned[R]:
        """Run `awaitable` as a task of the loop. Loop thread. Raises what the loop
        raises for an awaitable it cannot run (a future of another loop)."""

    @abc.abstractmethod
    def run_in_worker(self, func: Callable[[], R]) -> Spawned[R]:
        """Run `func()` on the loop's default worker threads. Loop thread."""

    @abc.abstractmethod
    def wrap_future(self, future: Any) -> Spawned[Any]:
        """A loop future following a `concurrent.futures.Future`. Loop thread."""

    @abc.abstractmethod
    def watch_readable(
        self, sock: socket.socket, callback: Callable[[], object]
    ) -> Callable[[], None] | None:
        """Call `callback()` on the loop thread each time `sock` has something to read,
        until the returned function is called (loop thread; the socket may be closed
        after it). None: this loop cannot watch sockets (asyncio's proactor loop).
        Loop thread; `callback` must not raise."""

    @abc.abstractmethod
    async def join_uncancellable(self, awaitable: Awaitable[Any]) -> bool:
        """Await `awaitable` to its end (its outcome ignored), even through
        cancellation of the caller; return whether the caller was cancelled meanwhile."""

    @abc.abstractmethod
    async def raise_cancelled(self) -> NoReturn:
        """Re-raise the caller's cancellation that `join_uncancellable` held back."""

    @abc.abstractmethod
    def cancelled_error(self) -> BaseException:
        """What awaiting a cancelled AsyncWork raises (API.md: asyncio.CancelledError)."""

    # -- membership and liveness -------------------------------------------------------

    def join(self, member: Member) -> None:
        """Make `member` shut down with the loop and keep `tsfn.run` alive, through
        the `Membership` it hands to `member._joined`. Any thread.

        Joining a loop whose shutdown has begun (from an executor thread that is
        being joined, say) shuts the member down as soon as the loop can run it.
        """
        membership = Membership(self, member)
        member._joined(membership)
        with self._lock:
            shut_down = self._shut_down
            if not shut_down:
                self._members.add(member)
                self._referenced += 1
                with self._busy_lock:
                    self._busy.add(self)
        if shut_down:
            membership._member = None  # nothing to leave
            membership.referenced = False
            with contextlib.suppress(
                RuntimeError
            ):  # closed already: the member's own closed-loop checks refuse calls
                self.call_soon_threadsafe(member._shutdown)

    def _hold(self, delta: int) -> None:
        with self._lock:
            self._referenced += delta
            idle = self._referenced == 0
        if idle:
            self._wake_idle()

    def _leave(self, member: Member, referenced: bool) -> None:
        with self._lock:
            self._members.discard(member)
            self._referenced -= referenced
            idle = self._referenced == 0
            if not self._members:
                with self._busy_lock:
                    self._busy.discard(self)
        if idle:
            self._wake_idle()

    async def shutdown(self) -> None:
        """Shut every member down, wait until each has finished, then return.

        Loop thread, loop running. A member raising KeyboardInterrupt or SystemExit
        (from `_shutdown`, or from its code run by the loop meanwhile: see
        `interrupted`) does not stop the others from shutting down; the first such
        exception is raised once all have finished.
        """
        with self._lock:
            self._shut_down = True
            members = list(self._members)
        self._shutting_down = True
        try:
            for member in members:
                try:
                    member._shutdown()
                except BaseException as exc:
                    self.interrupted(exc)
            for member in members:
                try:
                    await member._finished()
                except BaseException as exc:
                    self.interrupted(exc)
        finally:
            self._shutting_down = False
        self._wake_idle()
        interrupt, self._interrupt = self._interrupt, None
        if interrupt is not None:
            raise interrupt

    def interrupted(self, exc: BaseException) -> None:
        """A member's code on the loop thread raised `exc` (KeyboardInterrupt, SystemExit).

        Raises it, to stop the loop as any callback's interrupt does; but while
        `shutdown` shuts the members down, stopping the loop would leave some of them
        unfinished (their discards, finalizers, `complete`), so `shutdown` keeps the
        first one and raises it at the end instead.
        """
        if not self._shutting_down:
            raise exc
        self._interrupt = self._interrupt or exc

    def fault(self, message: str, exc: BaseException, **extra: Any) -> None:
        """A member's code on the loop thread raised `exc` (a finalizer, `complete`,
        `call_js` discarding): an interrupt goes on as `interrupted` says; anything
        else is reported, and the member goes on."""
        if let_through(exc):
            self.interrupted(exc)
        else:
            self.report(message, exc, **extra)

    async def wait_idle(self) -> None:
        """Return once nothing referenced is left (Node's loop would then exit)."""
        with self._lock:
            if self._referenced == 0 or self._shut_down:
                return
            self._idle = idle = self._idle or self.event()
        await idle.wait()

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            self.call_now_or_soon(idle.set)

    def call_now_or_soon(self, callback: Callable[[], object]) -> None:
        """Run `callback` now on the loop thread, else schedule it; a closed loop drops it."""
        if self.on_loop_thread():
            callback()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.call_soon_threadsafe(callback)
