"""The `Port` of asyncio loops (the default loop, uvloop, any `AbstractEventLoop`).

Shutdown. asyncio has no public "the loop is shutting down" callback. But
`asyncio.run`, `asyncio.Runner`, `tsfn.run` and uvloop's runner all await
`loop.shutdown_asyncgens()` while the loop still runs, right before closing it, and it
closes every async generator the loop's first-iteration hook has seen. So the port
hands that hook a `_Probe`, which looks enough like an async generator: its
`aclose()` is our shutdown, awaited on the loop thread with the loop running.

If the loop already ran `shutdown_asyncgens()` (the port is made by a function created
while the default executor is being shut down, after it), the hook formats a warning
with the probe's `repr` before it warns; the probe's `__repr__` raises instead, which
tells us, and no warning is issued (tsfn never touches the process-wide warning state).

The probe goes to the loop's own hook (`_asyncgen_firstiter_hook`, asyncio's loops and
uvloop's have it), not to the thread's: other code may wrap that one and look at
every generator it sees (a tracer formats it, trio's guest mode marks its `ag_frame`),
which a stand-in cannot survive, and whose `repr` would pass for the loop's warning.
A loop without that method gets the thread's hook, which is the loop's while it runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import socket
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, NoReturn, TypeVar

from ._loop import Event, Port, Spawned

__all__ = ["AsyncioPort", "asyncio_run"]

R = TypeVar("R")


class AsyncioPort(Port):
    """The port of one asyncio event loop."""

    # One port per loop, found by the loop's id (checked against the port's loop).
    # Held weakly: a port without members may go with its loop (see Port._busy).
    _ports: ClassVar[weakref.WeakValueDictionary[int, AsyncioPort]] = weakref.WeakValueDictionary()
    _ports_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._probe: _Probe | None = None
        # The data path calls these once per call or per batch: the loop's own
        # methods, with no frame of ours around them.
        self.call_soon_threadsafe = loop.call_soon_threadsafe  # type: ignore[method-assign,assignment]
        self.call_soon = loop.call_soon  # type: ignore[method-assign,assignment]
        self.is_closed = loop.is_closed  # type: ignore[method-assign]

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> AsyncioPort:
        """The port of `loop`, made (and its shutdown hook armed) on first use. Any thread."""
        with cls._ports_lock:
            # Ports of loops closed directly (loop.close()) were never shut down, so
            # they would stay busy forever: let them go now.
            with Port._busy_lock:
                Port._busy = {p for p in Port._busy if not p.is_closed()}
            port = cls._ports.get(id(loop))
            new = port is None or port.loop is not loop
            if new:
                port = cls._ports[id(loop)] = cls(loop)
        assert port is not None
        if new and not loop.is_closed():
            if port.on_loop_thread():
                port._arm()
            else:
                # The hook is armed on the loop thread while the loop runs; if the loop
                # closes first, there is nothing to arm.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(port._arm)
        return port

    def _arm(self) -> None:
        # See the module docstring. The thread's hooks are the loop's while it runs on
        # this thread, unless something wraps them.
        firstiter = (
            getattr(self.loop, "_asyncgen_firstiter_hook", None)
            or sys.get_asyncgen_hooks().firstiter
        )
        if self._probe is not None or firstiter is None or self.loop.is_closed():
            return
        self._probe = _Probe(self)
        try:
            firstiter(self._probe)  # type: ignore[arg-type]  # duck-typed: see above
        except _LateProbe:
            self.call_soon(self._shutdown_task)

    def _shutdown_task(self) -> None:
        self.loop.create_task(self._shutdown_in_task())

    async def _shutdown_in_task(self) -> None:
        """`shutdown()`, for a task: an interrupt it raises is raised from a callback.

        A task keeps the KeyboardInterrupt or SystemExit it raised, and asyncio's loop,
        stopped by it, never retrieves it: asyncio would log it when the task is
        collected ("Task exception was never retrieved"), and on 3.11 that log, inside
        a parse under way, breaks the parse (issue 9, defect 7). A callback's interrupt
        leaves the loop just the same, and nothing keeps it.
        """
        try:
            await self.shutdown()
        except (KeyboardInterrupt, SystemExit) as exc:
            self.call_soon(functools.partial(_raise, exc))

    @property
    def token(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.loop.call_soon(callback)

    def on_loop_thread(self) -> bool:
        return asyncio._get_running_loop() is self.loop

    def is_closed(self) -> bool:
        return self.loop.is_closed()

    def report(self, message: str, exc: BaseException, **extra: Any) -> None:
        self.loop.call_exception_handler({"message": message, "exception": exc, **extra})

    def event(self) -> Event:
        return asyncio.Event()

    def spawn(self, awaitable: Awaitable[R]) -> Spawned[R]:
        return asyncio.ensure_future(awaitable, loop=self.loop)

    def run_in_worker(self, func: Callable[[], R]) -> Spawned[R]:
        return self.loop.run_in_executor(None, func)

    def wrap_future(self, future: concurrent.futures.Future[R]) -> Spawned[R]:
        return asyncio.wrap_future(future, loop=self.loop)

    def watch_readable(
        self, sock: socket.socket, callback: Callable[[], object]
    ) -> Callable[[], None] | None:
        try:
            self.loop.add_reader(sock, callback)
        except NotImplementedError:
            return None  # a proactor loop (Windows) watches no sockets

        def stop() -> None:
            self.loop.remove_reader(sock)
            # uvloop (libuv's uv_poll_init) made the socket non-blocking; whoever reads
            # it next waits in recv.
            sock.setblocking(True)

        return stop

    async def join_uncancellable(self, awaitable: Awaitable[Any]) -> bool:
        future = asyncio.ensure_future(awaitable, loop=self.loop)
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                cancelled = True
        if not future.cancelled():
            future.exception()  # retrieved: its outcome is not the caller's business
        return cancelled

    async def raise_cancelled(self) -> NoReturn:
        raise asyncio.CancelledError

    def cancelled_error(self) -> BaseException:
        return asyncio.CancelledError()


class _LateProbe(Exception):
    """The loop's first-iteration hook formatted the probe: its shutdown has passed."""


class _Probe:
    """Stands in for an async generator in the loop's set of them; see the module doc."""

    __slots__ = ("__weakref__", "_port")

    def __init__(self, port: AsyncioPort) -> None:
        self._port = port

    def aclose(self) -> Coroutine[Any, Any, None]:
        return self._port._shutdown_in_task()

    def __repr__(self) -> str:
        raise _LateProbe


def _raise(exc: BaseException) -> None:
    raise exc


def asyncio_run(
    main: Coroutine[Any, Any, R],
    *,
    debug: bool | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> R:
    """`asyncio.run(main, debug=..., loop_factory=...)` on every Python tsfn supports.

    `asyncio.Runner` (3.11+) takes both arguments; on 3.10 its steps are taken here:
    `debug=None` leaves the loop's debug mode as the environment set it
    (`PYTHONASYNCIODEBUG`, `-X dev`), a loop from `loop_factory` is not made the
    thread's current loop, and tasks that fail while cancelled at the end are reported
    to the loop's exception handler.
    """
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
            return runner.run(main)
    from asyncio.runners import _cancel_all_tasks  # type: ignore[attr-defined]

    loop = (loop_factory or asyncio.new_event_loop)()  # pragma: no cover - 3.10 only
    # Like asyncio.Runner: only a loop of its own making becomes the current one.
    current = loop_factory is None
    try:  # pragma: no cover - 3.10 only
        if current:
            asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:  # pragma: no cover - 3.10 only
        try:
            # asyncio.run's own step on 3.10 (a release that gets security fixes only):
            # cancel what is left, then report what failed instead of ending cancelled.
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            if current:
                asyncio.set_event_loop(None)
            loop.close()
