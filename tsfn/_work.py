"""`AsyncWork`: Node-API's `napi_async_work` (create / queue / cancel) for asyncio.

`execute(data)` runs on a worker, `complete(status, data)` later on the loop thread,
and the work is awaitable for `execute`'s result. Like Node, `cancel()` succeeds only
while the work waits for a worker; once it runs, the worker may poll
`tsfn.cancelled()` instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import functools
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from ._cancel import CancelFlag, run_with_flag
from ._checks import check_callable, check_name, check_plain_callable
from ._loop import Event, Membership, Port, Spawned
from ._relay import DaskClient, RemoteWork, executor_of
from ._running import running_port

__all__ = ["AsyncWork", "Status"]

# Covariant: a work only gives its data (`.data`) and result (`await`) out, so an
# AsyncWork[ThreadsafeFunction[object], str] is an AsyncWork[ThreadsafeFunction[str], str].
D = TypeVar("D", covariant=True)
R = TypeVar("R", covariant=True)


class Status(enum.Enum):
    """How an AsyncWork ended, as passed to `complete` (Node's `napi_status`)."""

    OK = "ok"
    """`execute` returned."""
    CANCELLED = "cancelled"
    """`cancel()` took it off the queue before it started; `execute` never ran."""
    ERROR = "error"
    """`execute` raised."""


class _Gate:
    """Decides, once, whether the work starts or is cancelled first.

    Needed for the loop's default executor, whose future tsfn never sees (asyncio
    offers no public way to submit to it but `run_in_executor`). For an executor
    passed in, the executor's own future decides, which also works across processes.
    """

    __slots__ = ("_lock", "_state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "pending"

    def start(self) -> bool:
        with self._lock:
            if self._state == "pending":
                self._state = "started"
        return self._state == "started"

    def cancel(self, stop: Callable[[], bool] = lambda: True) -> bool:
        """Cancel if still pending and `stop()` agrees; True only the first time."""
        with self._lock:
            if self._state != "pending" or not stop():
                return False
            self._state = "cancelled"
            return True


class _Skipped(Exception):
    """Raised in the worker when the gate says the work was cancelled first."""


class _Raised(Exception):
    """Carries an exception that a loop's future would refuse (StopIteration)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)  # its args rebuild it when it crosses processes
        self.exc = exc


def _job(
    start: Callable[[], bool] | None, flag: CancelFlag, execute: Callable[[Any], R], data: Any
) -> R:
    """What the worker runs: `execute(data)`, unless `start()` says it was cancelled
    first (the default executor's gate, or a remote job's channel), with `flag` bound."""
    if start is not None and not start():
        raise _Skipped
    try:
        return run_with_flag(flag, functools.partial(execute, data))
    except StopIteration as exc:
        # asyncio refuses StopIteration in a future (it would end a generator);
        # any other exception travels as itself.
        raise _Raised(exc) from None


class AsyncWork(Generic[D, R]):
    """Run `execute(data)` on a worker, then `complete(status, data)` on the loop.

    `await work` returns `execute`'s return value, raises its exception, or raises
    `asyncio.CancelledError` if the work was cancelled before it started. Awaiting a
    work that was not queued queues it. Until `complete` has run, the work keeps
    `tsfn.run()` alive, like a referenced ThreadsafeFunction.

    `executor` is any `concurrent.futures.Executor` or a Dask `distributed.Client`;
    by default the loop's default executor (`loop.set_default_executor` applies). In
    another process (a process pool, Dask), `execute` and `data` must pickle, and
    `tsfn.cancelled()` works there as here: the job's channel back to this process
    tells it. `cancel()` succeeds while the executor still holds
    the job: for a process pool, until it hands the job to its processes' queue.
    """

    def __init__(
        self,
        execute: Callable[[D], R],
        complete: Callable[[Status, D], object] | None = None,
        *,
        data: D = None,  # type: ignore[assignment]
        executor: concurrent.futures.Executor | DaskClient | None = None,
        name: str | None = None,
    ) -> None:
        check_callable(execute, "execute", optional=False)
        check_plain_callable(complete, "complete", "on the loop as the work ends")
        self._executor, self._host = executor_of(executor)
        check_name(name)
        self._execute = execute
        self._complete = complete
        self._data = data
        self._remote: RemoteWork | None = None
        self._name = name
        self._flag = CancelFlag()
        self._gate = _Gate()
        self._executor_future: concurrent.futures.Future[R] | None = None
        self._port: Port | None = None
        self._membership: Membership | None = None
        self._done: Event | None = None  # set once complete has run
        self._status: Status | None = None
        self._outcome: BaseException | None = None  # execute's exception
        self._value: R | None = None

    @property
    def name(self) -> str | None:
        """The `name` given at creation, or None."""
        return self._name

    @property
    def data(self) -> D:
        """The `data` given at creation, as passed to `execute` and `complete`."""
        return self._data

    @property
    def status(self) -> Status | None:
        """How the work ended, once `complete` has run; None before."""
        return self._status

    def queue(self) -> AsyncWork[D, R]:
        """Schedule the work on its executor. Once only; call it on the loop thread."""
        if self._port is not None:
            raise RuntimeError(f"{self!r} was already queued; an AsyncWork runs once")
        port = running_port(f"{self!r}: queue()")
        # Submit first: if the executor refuses (it was shut down), the work stays
        # unqueued and the error goes to the caller; nothing waits on it.
        done: Spawned[R]
        if self._executor is None:
            done = port.run_in_worker(
                functools.partial(_job, self._gate.start, self._flag, self._execute, self._data)
            )
        elif self._host is not None:
            self._remote = RemoteWork(self._host, self._flag)
            self._executor_future = self._remote.submit_work(
                self._executor, _job, self._execute, self._data
            )
            done = port.wrap_future(self._executor_future)
        else:
            self._executor_future = self._executor.submit(
                _job, None, self._flag, self._execute, self._data
            )
            done = port.wrap_future(self._executor_future)
        self._port = port
        self._done = port.event()
        done.add_done_callback(self._on_done)
        port.join(self)  # hands us our membership: _joined
        return self

    def cancel(self) -> bool:
        """Cancel the work if it has not started; return whether it was.

        True: `execute` will not run and `complete` gets `Status.CANCELLED` (soon, on
        the loop thread, never inside this call). False: it is running or done (Node:
        `napi_generic_failure`), it was cancelled already, or it was never queued.
        """
        if self._executor_future is not None:
            # The executor's own future decides, or for another process the job's
            # ticket; the future completes as cancelled (or with _Skipped) and _on_done
            # follows. The gate makes a second cancel() return False.
            stop = self._remote.revoke if self._remote else self._executor_future.cancel
            return self._gate.cancel(stop)
        if self._port is None or not self._gate.cancel():
            return False
        # The default executor still holds the job and will skip it when a worker
        # frees up; complete now rather than then.
        with contextlib.suppress(
            RuntimeError
        ):  # a bare loop.close(): nothing can run complete any more
            self._port.call_soon_threadsafe(functools.partial(self._settle, Status.CANCELLED))
        return True

    def _on_done(self, done: Spawned[R]) -> None:
        # On the loop thread, once the executor is through with the job.
        exc = None if done.cancelled() else done.exception()
        if done.cancelled() or isinstance(exc, _Skipped):
            self._settle(Status.CANCELLED)
        elif exc is not None:
            self._settle(Status.ERROR, exc.exc if isinstance(exc, _Raised) else exc)
        else:
            self._value = done.result()
            self._settle(Status.OK)

    def _settle(self, status: Status, exc: BaseException | None = None) -> None:
        """Run `complete`, then wake the awaiters. Loop thread; first call wins."""
        assert self._port is not None
        assert self._done is not None
        assert self._membership is not None
        if self._status is not None:
            return  # a cancelled job that the default executor skipped only now
        self._status = status
        self._outcome = exc
        try:
            if self._complete is not None:
                self._complete(status, self._data)
        except BaseException as error:
            self._port.fault(f"Exception in the complete callback of {self!r}", error, work=self)
        finally:
            self._membership.leave()
            self._done.set()

    # The loop's shutdown (see _loop.Member): on the loop thread, loop still running.

    def _joined(self, membership: Membership) -> None:
        self._membership = membership

    def _shutdown(self) -> None:
        # Whatever has not started never will; a running execute is told through
        # tsfn.cancelled(), and waited for, so that complete runs once.
        self.cancel()
        self._flag.set()

    async def _finished(self) -> None:
        assert self._done is not None
        await self._done.wait()

    def __await__(self) -> Generator[Any, None, R]:
        return self._wait().__await__()

    async def _wait(self) -> R:
        if self._port is None:
            self.queue()
        assert self._port is not None
        assert self._done is not None
        try:
            await self._done.wait()
        except BaseException:
            # The awaiting task was cancelled, not the work: stop the work if it has
            # not started, otherwise let execute see tsfn.cancelled().
            if self._status is None and not self.cancel():
                self._flag.set()
            raise
        if self._status is Status.CANCELLED:
            raise self._port.cancelled_error()
        if self._outcome is not None:
            raise self._outcome
        return self._value  # type: ignore[return-value]

    def __repr__(self) -> str:
        label = self._name or getattr(self._execute, "__qualname__", "?")
        if self._status is not None:
            state = self._status.value
        else:
            state = "queued" if self._port is not None else "new"
        return f"<AsyncWork {label!r} {state}>"
