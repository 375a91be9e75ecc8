"""The loop-facing seam: everything tsfn asks of an event loop, in one module.

A ThreadsafeFunction or an AsyncWork needs four things from the loop it belongs to:
schedule a callback from any thread, tell whether the current thread runs the loop,
report an exception the way the loop reports its own, and learn that the loop is
shutting down. `LoopPort` is that seam; supporting another loop (trio through anyio)
means another implementation of it and nothing else.

The port also keeps the loop's *liveness* count, Node's `uv_ref`: how many
referenced functions and pending works still want the loop to run. `tsfn.run` waits
for it to reach zero (see `_run.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any, ClassVar, Protocol

__all__ = ["LoopPort", "Shutdownable"]


class Shutdownable(Protocol):
    """Something that must be closed on the loop thread before its loop closes."""

    def _shutdown(self) -> None: ...


class LoopPort:
    """One per event loop: scheduling, thread checks, error reports, shutdown, liveness."""

    # One port per loop, found by the loop's id (checked against the port's loop).
    # The table holds ports weakly and a port holds its loop weakly, so neither keeps
    # a finished loop alive: a port's shutdown sentinel refers to the loop (through
    # its asyncgen finalizer hook), so a strong table would keep every loop forever.
    # A port with members must live on regardless (its shutdown hook has work to
    # do), so `_busy` holds those.
    _ports: ClassVar[weakref.WeakValueDictionary[int, LoopPort]] = weakref.WeakValueDictionary()
    _busy: ClassVar[set[LoopPort]] = set()
    _ports_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        # Guards `_members`, `_referenced`, `_shut_down`: functions and works register
        # from any thread.
        self._lock = threading.Lock()
        self._members: set[Shutdownable] = set()
        self._referenced = 0
        self._shut_down = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._sentinel: AsyncGenerator[None, None] | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopPort:
        """The port of `loop`, created (and its shutdown hook armed) on first use."""
        with cls._ports_lock:
            # Loops closed directly (loop.close()) never shut their members down, so
            # their ports would stay busy forever: let them go now.
            cls._busy = {p for p in cls._busy if not p._loop_gone()}
            port = cls._ports.get(id(loop))
            new = port is None or port._loop() is not loop
            if new:
                port = cls._ports[id(loop)] = cls(loop)
        assert port is not None
        if new and not loop.is_closed():
            if port.on_loop_thread():
                port._arm_shutdown_hook()
            else:
                # The hook must be armed on the loop thread while the loop runs; if
                # the loop closes first, there is nothing to arm.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(port._arm_shutdown_hook)
        return port

    def _loop_gone(self) -> bool:
        loop = self._loop()
        return loop is None or loop.is_closed()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        # Whoever asks holds the loop (a function, a work, a running coroutine).
        assert loop is not None, "the port outlived its loop"
        return loop

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon_threadsafe(callback, *args)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        self.loop.call_soon(callback, *args)

    def on_loop_thread(self) -> bool:
        """True when the calling thread is the one running this loop."""
        return asyncio._get_running_loop() is self.loop

    def report(self, message: str, exc: BaseException, **extra: Any) -> None:
        """Hand `exc` to the loop's exception handler, as asyncio does for callbacks."""
        self.loop.call_exception_handler({"message": message, "exception": exc, **extra})

    # -- shutdown ---------------------------------------------------------------------

    def _arm_shutdown_hook(self) -> None:
        # There is no public "the loop is shutting down" callback. But asyncio.run,
        # asyncio.Runner (and uvloop, and tsfn.run) call `loop.shutdown_asyncgens()`
        # while the loop still runs, right before closing it, and that closes every
        # async generator the loop has seen start. So we start one that never ends:
        # its `finally` is our shutdown callback, on the loop thread, loop running.
        if self._sentinel is not None or self.loop.is_closed():
            return
        self._sentinel = _shutdown_sentinel(self)
        # Run it to its first `yield` (which ends the `asend` with StopIteration):
        # that registers it with the loop's asyncgen `firstiter` hook, which only the
        # running loop has installed. If the loop already ran shutdown_asyncgens()
        # (we are armed by a function created during the executor shutdown that
        # follows), the hook says so with a ResourceWarning: shut down right away.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with contextlib.suppress(StopIteration):
                self._sentinel.asend(None).send(None)
        if any(issubclass(w.category, ResourceWarning) for w in caught):
            self.shutdown()

    def register(self, member: Shutdownable) -> None:
        """Have `member._shutdown()` called on the loop thread when the loop shuts down."""
        with self._lock:
            shut_down = self._shut_down
            if not shut_down:
                self._members.add(member)
                with self._ports_lock:
                    self._busy.add(self)
        if shut_down:
            # Created after shutdown began (e.g. from an executor thread being joined):
            # close it as soon as possible rather than leave it open forever. If the
            # loop is already closed, its own closed-loop checks refuse every call.
            with contextlib.suppress(RuntimeError):
                self.call_soon_threadsafe(member._shutdown)

    def unregister(self, member: Shutdownable) -> None:
        with self._lock:
            self._members.discard(member)
            if not self._members:
                with self._ports_lock:
                    self._busy.discard(self)

    def shutdown(self) -> None:
        """Shut every registered member down. Loop thread only; called by the sentinel."""
        with self._lock:
            self._shut_down = True
            members = list(self._members)
            self._members.clear()
            with self._ports_lock:
                self._busy.discard(self)
        for member in members:
            member._shutdown()
        self._wake_idle_waiters()

    # -- liveness (Node's uv_ref / uv_unref) -----------------------------------------

    def hold(self) -> None:
        """One more reason for `tsfn.run` to keep the loop running. Any thread."""
        with self._lock:
            self._referenced += 1

    def unhold(self) -> None:
        """One reason fewer. Loop thread only: it may wake `wait_idle`."""
        with self._lock:
            self._referenced -= 1
            idle = self._referenced == 0
        if idle:
            self._wake_idle_waiters()

    async def wait_idle(self) -> None:
        """Return once nothing holds the loop (Node's loop would then exit)."""
        while True:
            with self._lock:
                if self._referenced == 0 or self._shut_down:
                    return
            waiter = self.loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def _shutdown_sentinel(port: LoopPort) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        port.shutdown()


def loop_or_running(
    loop: asyncio.AbstractEventLoop | None, owner: str
) -> asyncio.AbstractEventLoop:
    """`loop` if given (checked), else the running loop, with a clear error if none."""
    if loop is None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{owner} needs an event loop: create it inside a coroutine running on "
                "the loop, or pass loop=..."
            ) from None
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"loop must be an asyncio event loop or None, got {loop!r}")
    if loop.is_closed():
        raise ValueError(f"loop must not be closed, got {loop!r}")
    return loop
