"""What a delivery leaves behind: submission futures and awaitable results.

A callback (or `call_js`) that returns an awaitable has its item delivered only once
that awaitable has finished: it runs as a task of the loop, the function's finalizer
waits for it, and `abort` cancels it.

A `submit` caller holds a `concurrent.futures.Future`. It gets the callback's result
or exception, or is cancelled when its item is discarded. Cancelling it while the item
waits in the queue discards the item. While the callback runs, `cancel()` returns
False (as for any running `concurrent.futures.Future`). If it returned an awaitable,
the future then follows `asyncio.run_coroutine_threadsafe`: `cancel()` cancels the
task, and a task cancelled (by `abort`, say) cancels the future.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
from inspect import isawaitable
from typing import Any, Generic, Protocol, TypeVar

from ._loop import Port, Spawned, let_through

__all__ = ["Results", "Submission", "SubmitFuture"]

T = TypeVar("T")


class SubmitFuture(concurrent.futures.Future[T]):
    """The future `submit` returns: not cancellable while a plain callback runs.

    `concurrent.futures` has one "running" state, after which `cancel()` fails for
    good; an awaitable result must stay cancellable after its callback returned, so
    the callback's run is marked here instead.
    """

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._calling = False

    def start_call(self) -> bool:
        """Mark the callback as running; False if the caller cancelled first."""
        with self._guard:
            if self.cancelled():
                return False
            self._calling = True
            return True

    def end_call(self) -> None:
        with self._guard:
            self._calling = False

    def cancel(self) -> bool:
        with self._guard:
            return not self._calling and super().cancel()

    def running(self) -> bool:
        return self._calling or super().running()


class Submission(Generic[T]):
    """A queued item whose caller waits for the callback's result (`submit`)."""

    __slots__ = ("data", "future")

    def __init__(self, data: T, future: SubmitFuture[Any]) -> None:
        self.data = data
        self.future = future


Future = concurrent.futures.Future[Any]


class Owner(Protocol):
    """The function whose deliveries these are (a ThreadsafeFunction)."""

    def _invoke(self, data: Any, /) -> object: ...

    def _report(self, what: str, exc: BaseException) -> None: ...

    def _maybe_finish(self) -> None: ...


class Results:
    """The running tasks of one function's awaitable results. Loop thread only.

    Each call names its `owner`, which reports faults (`_report`) and may finish once
    a task ends (`_maybe_finish`); the tasks' callbacks hold it only while they run,
    so that a dropped function is freed by reference counting alone.
    """

    __slots__ = ("_port", "tasks")

    def __init__(self, port: Port) -> None:
        self._port = port
        self.tasks: set[Spawned[Any]] = set()

    def deliver(self, owner: Owner, item: Submission[Any]) -> bool:
        """Deliver a submission; False if its caller took it back (then discard it)."""
        future = item.future
        if not future.start_call():
            return False
        # The call ends only once the future holds its outcome, so that a cancel()
        # cannot slip in between and drop a result that exists.
        try:
            result = owner._invoke(item.data)
        except BaseException as exc:
            self.failed(owner, exc, future)
            future.end_call()
            if let_through(exc):
                raise
            return True
        try:
            self.returned(owner, result, future)
        finally:
            future.end_call()
        return True

    def returned(self, owner: Owner, result: object, future: Future | None) -> None:
        """A callback returned `result`: settle `future`, or run an awaitable."""
        if result is None or not isawaitable(result):
            if future is not None:
                _settle(future, result, None)
            return
        try:
            task = self._port.spawn(result)
        except Exception as exc:  # an awaitable this loop cannot run (another loop's)
            with contextlib.suppress(AttributeError):
                result.close()  # type: ignore[attr-defined]  # a coroutine: not "never awaited"
            self.failed(owner, exc, future)
            return
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._task_done, owner, future))
        if future is not None:
            future.add_done_callback(functools.partial(self._future_done, task))

    def failed(self, owner: Owner, exc: BaseException, future: Future | None) -> None:
        """A callback raised `exc`, or its awaitable did."""
        if future is None:
            owner._report("Exception in the callback", exc)
        else:
            _settle(future, None, exc)

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def _future_done(self, task: Spawned[Any], future: Future) -> None:
        # Any thread: the caller cancelled the future of a running async callback. On
        # the loop thread the task is cancelled at once, while it still waits: trio
        # delivers a cancel only at a checkpoint, so one deferred past a wake-up that
        # is already scheduled would come too late.
        if future.cancelled():
            self._port.call_now_or_soon(task.cancel)

    def _task_done(self, owner: Owner, future: Future | None, task: Spawned[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            if future is not None:
                future.cancel()
        elif (exc := task.exception()) is not None:
            self.failed(owner, exc, future)
        elif future is not None:
            _settle(future, task.result(), None)
        owner._maybe_finish()


def _settle(future: Future, result: object, exc: BaseException | None) -> None:
    # A caller may cancel a pending future at any time (async callbacks): that is its
    # right, and it wins.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
