"""What a ThreadsafeFunction's owner sees of it, apart from the data path.

`Handle` is the base of `ThreadsafeFunction` (`_function.py` holds the data path and
sets every attribute used here): the constructor's signature, typing and argument
checks; `acquire` / `release` / `abort` (the counting and closing themselves are
`_lifecycle.py`'s); the read-only state (`context`, `name`, `thread_count`,
`closing`, `closed`, `qsize`, the repr); liveness (Node's
`napi_ref_threadsafe_function` / `unref`: whether it keeps `tsfn.run` running); and
the wait for its finalizer (`wait_closed`, `async with`). `Lease` is what `acquire()`
returns.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeAlias, overload

from typing_extensions import Self, TypeVar

if TYPE_CHECKING:
    from trio.lowlevel import TrioToken

from ._checks import check_callable, check_count, check_name, check_plain_callable
from ._lifecycle import Lifecycle, State
from ._loop import Event, Membership, Port
from ._running import port_of, running_port

__all__ = ["Handle", "Lease"]

# A function takes items (`call(data: T)`): one that takes any object also takes
# strings, hence contravariant. It gives results (`submit() -> Future[R]`): covariant;
# `R` defaults to Any so that `ThreadsafeFunction[str]` stays a complete annotation.
T = TypeVar("T", contravariant=True)
R = TypeVar("R", covariant=True, default=Any)

# The loop a function belongs to, when given explicitly (`loop=`).
Loop: TypeAlias = "asyncio.AbstractEventLoop | TrioToken"
Finalizer = Callable[[Any], object]


class Handle(Generic[T, R]):
    """The constructor's checks, state, liveness and closing wait of a ThreadsafeFunction."""

    # The data path: its set-up after the checks, and its wake-up (ThreadsafeFunction).
    _setup: Callable[..., None]
    _wake: Callable[[], bool]
    # Set by it.
    _port: Port
    _membership: Membership
    _life: Lifecycle
    _queue: deque[Any]
    _callback: Any
    _call_js: Any
    _context: Any
    _name: str | None
    _closed: bool
    _closed_event: Event | None

    # The overloads type `R` from the callback (or call_js), unwrapping an awaitable,
    # and make a call that gives neither a type error. (The last one is for callers
    # passing both as optional values; at run time one of them must be set.)
    @overload
    def __init__(
        self,
        callback: Callable[[T], Awaitable[R]],
        *,
        call_js: None = None,
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        callback: Callable[[T], R],
        *,
        call_js: None = None,
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        callback: Callable[[T], object] | None = None,
        *,
        call_js: Callable[[Any, Callable[[T], object] | None, Any, T], Awaitable[R]],
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        callback: Callable[[T], object] | None = None,
        *,
        call_js: Callable[[Any, Callable[[T], object] | None, Any, T], R],
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self,
        callback: Callable[[T], object] | None,
        *,
        call_js: Callable[[Any, Callable[[T], object] | None, Any, T], object] | None,
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None: ...
    def __init__(
        self,
        callback: Callable[..., object] | None = None,
        *,
        call_js: Callable[..., object] | None = None,
        context: Any = None,
        max_queue_size: int = 0,
        initial_thread_count: int = 1,
        finalizer: Finalizer | None = None,
        name: str | None = None,
        loop: Loop | None = None,
    ) -> None:
        check_callable(callback, "callback")
        check_callable(call_js, "call_js")
        if callback is None and call_js is None:
            raise TypeError("ThreadsafeFunction needs a callback or call_js (both are None)")
        check_count(max_queue_size, "max_queue_size", 0)
        check_count(initial_thread_count, "initial_thread_count", 1)
        check_plain_callable(finalizer, "finalizer", "once, as the function closes")
        check_name(name)
        port = running_port("ThreadsafeFunction") if loop is None else port_of(loop)
        self._setup(
            port, callback, call_js, context, max_queue_size, initial_thread_count, finalizer, name
        )

    # -- producers and closing: any thread ----------------------------------------------

    def acquire(self) -> Lease[Self]:
        """Count one more producer; raise `Closing` if closing.

        The return value is a context manager whose exit calls `release()`:
        ``with fn.acquire(): ...``.
        """
        self._life.acquire(self)
        return Lease(self)

    def release(self) -> None:
        """Count one producer fewer. At zero the function starts closing.

        Items already queued are still delivered, then the finalizer runs. Raises
        `Closing` if the count is already zero (released more than acquired).
        Allowed after `abort` while producers remain, as in Node-API.
        """
        # Deliver what is queued, then finalize.
        self._close_and_wake(lambda: self._life.release(self))

    def abort(self) -> None:
        """Close now. Idempotent.

        Further calls, and every caller waiting for room, raise `Closing`. Items still
        queued are not given to the callback but to ``call_js(None, None, context,
        data)`` (when `call_js` was given), so what they hold can be released; then
        the finalizer runs, on the loop thread.
        """
        self._close_and_wake(self._life.abort)

    def _close_and_wake(self, close: Callable[[], bool]) -> None:
        # `close()` moves the state (True if it began closing), then the wake-up tells the
        # loop, which finalizes. Calls are refused from now on, so no other wake-up will
        # come: an interrupt in between (CPython raises a pending signal or asynchronous
        # exception as a function starts, `_wake` included) must not lose this one. So
        # wake once more (an extra drain is harmless), then let the interrupt through.
        try:
            if close() and not self._wake():
                self._life.lose_loop()  # a bare loop.close(): nothing will finalize
        except BaseException:
            if self._life.state is not State.OPEN:
                self._wake()
            raise

    # -- loop thread: liveness ---------------------------------------------------------

    def ref(self) -> None:
        """Keep `tsfn.run()` running until this function closes (the default).

        Like Node's `napi_ref_threadsafe_function`: idempotent, not counted. Loop
        thread only.
        """
        self._check_loop_thread("ref")
        self._membership.ref()

    def unref(self) -> None:
        """Let `tsfn.run()` finish while this function is open (it is then aborted).

        Idempotent, not counted. Loop thread only.
        """
        self._check_loop_thread("unref")
        self._membership.unref()

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
        return self._life.threads

    @property
    def closing(self) -> bool:
        """True once no call can succeed: released to zero, aborted, or loop closed."""
        return self._life.state is not State.OPEN or self._port.is_closed()

    @property
    def closed(self) -> bool:
        """True once the finalizer has run."""
        return self._closed

    def qsize(self) -> int:
        """Items accepted and not yet handed to the callback (or discarded)."""
        return len(self._queue)

    async def wait_closed(self) -> None:
        """Return after the finalizer has run. Await it on the function's loop."""
        if self._closed:
            return
        if not self._port.on_loop_thread():
            raise RuntimeError(f"{self!r}: wait_closed() must be awaited on its own loop")
        if self._closed_event is None:
            self._closed_event = self._port.event()
        await self._closed_event.wait()

    async def __aenter__(self) -> Self:
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

    def _mark_closed(self) -> None:
        self._closed = True
        if self._closed_event is not None:
            self._closed_event.set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._life.state.value
        label = self._name or getattr(self._callback or self._call_js, "__qualname__", "?")
        return (
            f"<ThreadsafeFunction {label!r} {state} threads={self._life.threads} "
            f"queued={len(self._queue)}>"
        )

    def __reduce__(self) -> NoReturn:
        # A copy in another process would take calls that reach no loop.
        raise TypeError(
            f"{self!r} cannot be pickled: it belongs to its event loop, in this process. "
            "To send items from another process, run the producer with tsfn.stream on a "
            "concurrent.futures.ProcessPoolExecutor or a Dask distributed.Client"
        )


H = TypeVar("H", bound=Handle[Any, Any])


class Lease(Generic[H]):
    """Returned by `acquire()`: leaving the `with` block releases that producer."""

    __slots__ = ("_fn",)

    def __init__(self, fn: H) -> None:
        self._fn = fn

    def __enter__(self) -> H:
        return self._fn

    def __exit__(self, *exc_info: object) -> None:
        self._fn.release()
