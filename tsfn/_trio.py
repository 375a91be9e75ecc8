"""The `Port` of a trio run (`trio.run`, `anyio.run(..., backend="trio")`).

Imported only once trio is: `_running.py` looks for a trio run only when the `trio`
module is loaded, so tsfn never needs trio otherwise.

Scheduling. Any thread schedules with the run's `TrioToken.run_sync_soon`: trio's
entry queue, one wake-up of the run per call that finds it idle, FIFO, and every
callback it accepts runs before `trio.run` returns.

Shutdown. A system task of the port (the *guard*) sleeps until trio cancels it, which
trio does to every system task once the main task has returned (or raised). The guard
then shuts the port's members down, shielded: abort, discard, finalizers. trio runs
the entry queue in a nursery outside the system tasks' one and closes it only after
every system task has ended, so the drains and finalizers the shutdown schedules
still run. Then the port is closed: `call` raises `Closing`. An interrupt a member
raised in the shutdown leaves `trio.run` as the run's outcome (`_raise_from_run`).

Errors. trio has no handler for errors of callbacks (an exception escaping a
`run_sync_soon` callback or a system task crashes the run with `TrioInternalError`).
tsfn promises that delivery goes on after a failing callback, so on trio `report`
logs the exception to the `tsfn` logger, as asyncio's default handler logs to the
`asyncio` logger.

Futures. trio has none; `_Future` is the small one-shot future the library's code
needs (the `Spawned` protocol), used on the loop thread only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

import outcome
import trio

from ._loop import Event, Port, Spawned

__all__ = ["TrioPort"]

R = TypeVar("R")

logger = logging.getLogger("tsfn")


class TrioPort(Port):
    """The port of one trio run, known by its `TrioToken`."""

    _ports: ClassVar[weakref.WeakValueDictionary[trio.lowlevel.TrioToken, TrioPort]] = (
        weakref.WeakValueDictionary()
    )
    _ports_lock = threading.Lock()

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        super().__init__()
        self._token = token
        self._closed = False
        self._armed = False
        # The data path schedules once per batch: trio's own method, no frame of ours.
        self.call_soon_threadsafe = token.run_sync_soon  # type: ignore[method-assign,assignment]
        self.call_soon = token.run_sync_soon  # type: ignore[method-assign,assignment]

    @classmethod
    def of(cls, token: trio.lowlevel.TrioToken) -> TrioPort:
        """The port of the run `token` names, its guard started on first use. Any thread."""
        with cls._ports_lock:
            port = cls._ports.get(token)
            new = port is None
            if port is None:
                port = cls._ports[token] = cls(token)
        if new:
            if port.on_loop_thread():
                port._arm()
            else:
                try:
                    token.run_sync_soon(port._arm)
                except trio.RunFinishedError:
                    port._closed = True
        return port

    def _arm(self) -> None:
        if self._armed:
            return
        self._armed = True
        try:
            trio.lowlevel.spawn_system_task(self._guard, name="tsfn shutdown guard")
        except RuntimeError:
            # The system nursery has closed: this run's shutdown has passed (a function
            # made in an async generator's finalizer, say). Members joining now are
            # shut down as they join.
            with self._lock:
                self._shut_down = True

    async def _guard(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.shutdown()
                except BaseException as exc:  # an interrupt from a finalizer, say
                    if not _raise_from_run(exc):
                        logger.error("Exception in the shutdown of %r", self, exc_info=exc)
                finally:
                    self._closed = True

    # -- primitives --------------------------------------------------------------------

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        return self._token

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self._token.run_sync_soon(callback)

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._token.run_sync_soon(callback)

    def on_loop_thread(self) -> bool:
        try:
            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def is_closed(self) -> bool:
        return self._closed

    def report(self, message: str, exc: BaseException, **extra: Any) -> None:
        logger.error("%s", message, exc_info=exc, extra=extra)

    def event(self) -> Event:
        return trio.Event()

    def spawn(self, awaitable: Awaitable[R]) -> Spawned[R]:
        future: _Future[R] = _Future(self, task=True)
        trio.lowlevel.spawn_system_task(future._run, awaitable, name=awaitable)
        return future

    def run_in_worker(self, func: Callable[[], R]) -> Spawned[R]:
        # trio's thread cache, under its default CapacityLimiter (anyio's default
        # limiter on trio is that one too).
        return self.spawn(trio.to_thread.run_sync(func))

    def wrap_future(self, future: concurrent.futures.Future[R]) -> Spawned[R]:
        follower: _Future[R] = _Future(self, task=False)
        future.add_done_callback(functools.partial(self._follow, follower))
        return follower

    def _follow(self, follower: _Future[R], future: concurrent.futures.Future[R]) -> None:
        # Any thread (the executor's): settle the follower on the loop thread.
        with contextlib.suppress(trio.RunFinishedError):  # nobody is left to wait for it
            self._token.run_sync_soon(follower._copy, future)

    def watch_readable(
        self, sock: socket.socket, callback: Callable[[], object]
    ) -> Callable[[], None] | None:
        scope = trio.CancelScope()

        async def watch() -> None:
            with scope, contextlib.suppress(trio.ClosedResourceError):
                # Stopped by `callback` or while this task was woken, it must not wait
                # again: the socket may be closed already.
                while not scope.cancel_called:
                    await trio.lowlevel.wait_readable(sock)
                    if not scope.cancel_called:
                        callback()

        def stop() -> None:
            scope.cancel()
            # The socket may be closed next: trio must forget it first.
            trio.lowlevel.notify_closing(sock)

        trio.lowlevel.spawn_system_task(watch, name=f"tsfn watching {sock!r}")
        return stop

    async def join_uncancellable(self, awaitable: Awaitable[Any]) -> bool:
        # Its outcome is not the caller's business here.
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await awaitable
        return trio.current_effective_deadline() == -math.inf

    async def raise_cancelled(self) -> NoReturn:
        await trio.lowlevel.checkpoint()  # raises the caller's pending Cancelled
        raise AssertionError("raise_cancelled() called while not cancelled")

    def cancelled_error(self) -> BaseException:
        # API.md: a cancelled AsyncWork raises asyncio.CancelledError on every loop
        # (trio's Cancelled belongs to cancel scopes and cannot be made by hand).
        return asyncio.CancelledError()

    def __repr__(self) -> str:
        return f"<TrioPort {self._token!r}{' closed' if self._closed else ''}>"


def _raise_from_run(exc: BaseException) -> bool:
    """Make `trio.run` raise `exc` once it ends; False where trio offers no way.

    A system task must not raise: trio would crash the run with TrioInternalError. But
    the main task has returned by the time the guard runs, and trio raises from `run`
    what its runner holds as the main task's outcome. That is how trio itself raises a
    KeyboardInterrupt that arrives during its shutdown (`Runner.ki_pending`), so the
    interrupt takes the same way, chained to the main task's own error if it had one.
    The runner is private to trio: if a later trio has none, the interrupt is logged.
    """
    runner = getattr(trio._core._run.GLOBAL_RUN_CONTEXT, "runner", None)
    before = getattr(runner, "main_task_outcome", None)
    if not isinstance(before, (outcome.Value, outcome.Error)):
        return False
    if isinstance(before, outcome.Error) and before.error is not exc:
        exc.__context__ = before.error
    runner.main_task_outcome = outcome.Error(exc)  # type: ignore[union-attr]
    return True


class _Future(Generic[R]):
    """A one-shot future of the run (loop thread only): `Spawned`, awaitable."""

    __slots__ = ("_callbacks", "_done", "_exc", "_port", "_result", "_scope", "_state", "_task")

    def __init__(self, port: TrioPort, *, task: bool) -> None:
        self._port = port
        self._task = task  # runs an awaitable (spawn), or follows another future
        self._state = "pending"  # then "cancelled", "raised" or "returned"
        self._result: R | None = None
        self._exc: BaseException | None = None
        self._scope: trio.CancelScope | None = None
        self._callbacks: list[Callable[[Any], object]] = []
        self._done = trio.Event()

    async def _run(self, awaitable: Awaitable[R]) -> None:
        # A system task: nothing may escape it (trio would crash the run).
        with trio.CancelScope() as self._scope:
            if self._state != "pending":  # cancelled before it started
                self._scope.cancel()
            try:
                self._result = await awaitable
            except trio.Cancelled:
                self._set("cancelled")
                raise
            except BaseException as exc:
                self._exc = exc
                self._set("raised")
                return
            self._set("returned")
        if self._state == "pending":
            self._set("cancelled")  # the scope swallowed the cancellation

    def _copy(self, future: concurrent.futures.Future[R]) -> None:
        if future.cancelled():
            self._set("cancelled")
        elif (exc := future.exception()) is not None:
            self._exc = exc
            self._set("raised")
        else:
            self._result = future.result()
            self._set("returned")

    def _set(self, state: str) -> None:
        if self._state not in ("pending", "cancelling"):
            return
        self._state = state
        self._done.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    # -- Spawned -----------------------------------------------------------------------

    def cancel(self) -> bool:
        if self.done():
            return False
        if self._scope is not None:
            self._scope.cancel()
        elif self._task:
            self._state = "cancelling"  # not started yet: it cancels itself at once
        else:
            self._set("cancelled")  # a follower stops following
        return True

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def done(self) -> bool:
        return self._state not in ("pending", "cancelling")

    def result(self) -> R:
        if self._state == "raised":
            assert self._exc is not None
            raise self._exc
        if self._state == "cancelled":
            raise concurrent.futures.CancelledError
        if not self.done():
            raise concurrent.futures.InvalidStateError(f"{self!r} is not done")
        return self._result  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        if self._state == "cancelled":
            raise concurrent.futures.CancelledError
        if not self.done():
            raise concurrent.futures.InvalidStateError(f"{self!r} is not done")
        return self._exc

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        if self.done():
            self._port.call_soon(functools.partial(fn, self))  # never inside this call
        else:
            self._callbacks.append(fn)

    def __await__(self) -> Generator[Any, None, R]:
        return self._wait().__await__()

    async def _wait(self) -> R:
        await self._done.wait()
        return self.result()

    def __repr__(self) -> str:
        return f"<tsfn trio future {self._state}>"
