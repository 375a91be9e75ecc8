"""Cancellation a worker can poll, wait for, or hook: `cancelled()` and `cancel_token()`.

A worker (an AsyncWork's `execute`, a `stream` function) runs with a `CancelFlag`
bound to its thread. The loop side sets the flag when the awaiting task is cancelled
or the stream's consumer leaves. Python cannot interrupt a thread safely, so the
worker is *told*, three ways:

- it polls `cancelled()` at its own pace (anyio's `from_thread.check_cancelled`);
- it blocks in `cancel_token().wait()`, a `threading.Event`-like wait;
- it hooks a callable with `cancel_token().on_cancel(stop)`, for code that cannot
  poll because a library's loop holds the thread (paho's `loop_forever`, a watchdog
  `Observer`, a C library's own thread): the hook tells that library to stop.

`CancelFlag.set()` is the one way in: the loop side, and later a channel from another
process, only ever call that. Hooks run on a helper thread that `set()` starts, not
on the thread that called `set()` (the loop's; the one exception is an interpreter
that is finalizing and starts no threads), and never while the flag's lock is held,
so a hook may block (join a thread, wait for a socket to close).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from ._checks import check_callable, check_timeout

__all__ = ["CancelFlag", "CancelHook", "CancelToken", "cancel_token", "cancelled", "run_with_flag"]

R = TypeVar("R")

_local = threading.local()


class _State(enum.Enum):
    PENDING = "pending"  # registered; runs if the flag is set while the worker runs
    QUEUED = "queued"  # the flag was set: the hooks thread will run it
    RUNNING = "running"
    DONE = "done"  # ran (raised or not)
    REMOVED = "removed"  # removed before it ran, or its work returned first: never runs


class CancelFlag:
    """One work's cancellation: a one-way flag, a wait, and the hooks to run once.

    `is_set` is a plain attribute so that a poll costs one read, without the lock: a
    reader sees the old or the new value, and either is fine for a poll. Everything
    else (the hooks, their states, `_ended`) is guarded by `_changed`'s lock, which is
    also what `wait()` and `CancelHook.remove()` wait on.
    """

    __slots__ = ("_changed", "_ended", "_hooks", "is_set")

    def __init__(self) -> None:
        self.is_set: bool = False
        self._changed = threading.Condition(threading.Lock())
        # Hooks that have not finished, in registration order (a dict: O(1) removal).
        self._hooks: dict[CancelHook, None] = {}
        self._ended = False  # the worker has returned: no more hooks, none left to run

    def __reduce__(self) -> tuple[Callable[[bool], CancelFlag], tuple[bool]]:
        # A job sent to another process by an executor tsfn does not know carries its
        # flag: the copy there has the same state and no hooks, and nothing sets it.
        # (Process pools and Dask get a flag of their own there, set through the job's
        # channel: see _remote.py.)
        return _copied_flag, (self.is_set,)

    def set(self) -> None:
        """Cancel: wake the waiters and run the hooks on a helper thread. Idempotent."""
        with self._changed:
            if self.is_set:
                return
            self.is_set = True
            hooks = list(self._hooks)
            for hook in hooks:
                hook._state = _State.QUEUED  # from now on the worker's return waits for it
            self._changed.notify_all()
        if not hooks:
            return
        runner = threading.Thread(
            target=_run_hooks, args=(hooks,), name="tsfn-cancel-hooks", daemon=False
        )
        try:
            runner.start()
        except RuntimeError:
            # The interpreter is finalizing and starts no threads (3.12+); no loop is
            # running any more either, so this thread is as good as any.
            _run_hooks(hooks)

    def wait(self, timeout: float | None) -> bool:
        """Block until set (True) or `timeout` seconds pass (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.is_set, timeout)

    def add_hook(self, callback: Callable[[], object]) -> CancelHook:
        """Run `callback` once when the flag is set (see `CancelToken.on_cancel`)."""
        hook = CancelHook(self, callback)
        with self._changed:
            if self._ended:
                raise RuntimeError("on_cancel() after the worker returned: its work is over")
            self._hooks[hook] = None
            if not self.is_set:
                return hook
            hook._claim()  # under the lock: nothing can remove it before it runs
        hook._call(report=False)  # already cancelled: at once, here; exceptions propagate
        return hook

    def remove(self, hook: CancelHook) -> bool:
        """Take `hook` back; False if it already ran or was removed."""
        with self._changed:
            if hook._state in (_State.PENDING, _State.QUEUED):
                hook._state = _State.REMOVED
                del self._hooks[hook]
                return True
            if hook._thread != threading.get_ident():  # a hook may remove itself
                self._changed.wait_for(lambda: hook._state is not _State.RUNNING)
            return False

    def end(self) -> None:
        """The worker returns: drop the hooks never triggered; wait for the others.

        So a hook never runs after its worker has returned (a consumer that leaves a
        stream after its worker finished sets the flag too), and the block waiting for
        the worker is not left while a hook still works on the library. Hooks the flag
        triggered before (the worker may well return *because* one of them stopped its
        library) still run, and the worker's return waits for them.
        """
        me = threading.get_ident()
        with self._changed:
            self._ended = True
            for hook in list(self._hooks):
                if hook._state is _State.PENDING:
                    hook._state = _State.REMOVED
                    del self._hooks[hook]
            # The worker itself may be running a hook it added after the cancellation.
            self._changed.wait_for(lambda: all(h._thread == me for h in self._hooks))


def _copied_flag(is_set: bool) -> CancelFlag:
    flag = CancelFlag()
    flag.is_set = is_set
    return flag


class CancelHook:
    """A callable registered with `CancelToken.on_cancel`: remove it, or use it as a
    context manager (``with token.on_cancel(stop): ...``), whose exit removes it."""

    __slots__ = ("_callback", "_flag", "_state", "_thread")

    def __init__(self, flag: CancelFlag, callback: Callable[[], object]) -> None:
        self._flag = flag
        self._callback = callback
        self._state = _State.PENDING
        self._thread: int | None = None  # the thread running it, while it runs

    def remove(self) -> bool:
        """Unregister the hook; return True if it had not started (now it never will).

        False: it has run (or is running), or its worker returned first. If it is
        running on another thread right now, `remove()` first waits for it to return,
        so after `remove()` the hook is not running and never will be. (Do not call
        `remove()` from code the hook itself waits for; a hook may remove itself.)
        """
        return self._flag.remove(self)

    def __enter__(self) -> CancelHook:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def _run(self) -> None:
        """On the hooks thread: run unless removed while the hooks before it ran."""
        with self._flag._changed:
            if self._state is not _State.QUEUED:
                return
            self._claim()
        self._call(report=True)

    def _claim(self) -> None:
        # Under the flag's lock.
        self._state = _State.RUNNING
        self._thread = threading.get_ident()

    def _call(self, *, report: bool) -> None:
        flag = self._flag
        try:
            self._callback()
        except BaseException as exc:
            if not report:
                raise
            # Nobody waits for the hooks thread: report as for any thread's uncaught
            # exception (threading.excepthook, which prints it by default), then go on
            # with the next hook. SystemExit is ignored there, as in any thread.
            threading.excepthook(
                threading.ExceptHookArgs(
                    (type(exc), exc, exc.__traceback__, threading.current_thread())
                )
            )
        finally:
            with flag._changed:
                self._state = _State.DONE
                self._thread = None
                del flag._hooks[self]
                flag._changed.notify_all()

    def __repr__(self) -> str:
        return f"<CancelHook {self._callback!r} {self._state.value}>"


def _run_hooks(hooks: list[CancelHook]) -> None:
    """The hooks thread: each hook once, in registration order, one after the other."""
    for hook in hooks:
        hook._run()


class CancelToken:
    """The current worker's cancellation, for code that waits or that a library blocks.

    Get it with `tsfn.cancel_token()` inside a worker. It may be handed to other
    threads (the library's, your own): every method is thread-safe. Cancellation is
    one-way: once `cancelled` is True it stays True.
    """

    __slots__ = ("_flag",)

    def __init__(self, flag: CancelFlag) -> None:
        self._flag = flag

    @property
    def cancelled(self) -> bool:
        """True once the work is cancelled (what `tsfn.cancelled()` returns in the worker)."""
        return self._flag.is_set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work is cancelled, or `timeout` seconds pass (None: no limit).

        Returns `cancelled`: True if it was cancelled, False on timeout, as
        `threading.Event.wait` does.
        """
        check_timeout(timeout)
        return self._flag.wait(timeout)

    def on_cancel(self, callback: Callable[[], object]) -> CancelHook:
        """Run ``callback()`` once when the work is cancelled; return its `CancelHook`.

        - If the work is cancelled later, `callback` runs on a helper thread
          (``tsfn-cancel-hooks``), never on the loop thread and never while tsfn holds
          a lock, so it may block: stop a library, join its thread, close a socket.
          The hooks of one work run there one after the other, in the order they were
          registered. An exception from a hook goes to `threading.excepthook` (which
          prints it), and the next hook still runs.
        - If the work is already cancelled, `callback` runs at once, in the calling
          thread, before `on_cancel` returns, and its exception propagates.
        - When the worker returns (or raises), hooks the work's cancellation has not
          triggered are dropped: they never run. Hooks it has triggered run all the
          same, and the worker's return waits for them (a worker often returns
          *because* a hook stopped its library), so the `stream` block, or the
          AsyncWork's `complete`, comes after them. Remove a hook yourself (the `with`
          form) as soon as the library it would stop has stopped anyway.

        Raises `TypeError` if `callback` is not callable, and `RuntimeError` after the
        worker has returned.
        """
        check_callable(callback, "callback", optional=False)
        return self._flag.add_hook(callback)

    def __repr__(self) -> str:
        return f"<CancelToken cancelled={self._flag.is_set}>"


def cancelled() -> bool:
    """True inside a worker whose result is no longer wanted.

    In an `AsyncWork`'s `execute`: the task awaiting the work was cancelled after
    `execute` had started. In a `stream` function: the consumer has left the
    `async with` block (or its task was cancelled), so the next `emit` raises
    `Closing`. This holds in worker processes (a process pool, a Dask worker) too:
    the loop's process tells them over the job's channel. Outside a worker it is
    always False.
    """
    flag: CancelFlag | None = getattr(_local, "flag", None)
    return flag is not None and flag.is_set


def cancel_token() -> CancelToken:
    """The `CancelToken` of the worker running on this thread.

    Inside an `AsyncWork`'s `execute` or a `stream` function, on the worker's own
    thread (hand the token to other threads yourself). Its `cancelled` is what
    `tsfn.cancelled()` returns there, and it turns True at the same moments.

    Raises `RuntimeError` anywhere else (the loop thread, a thread of your own, a
    pool thread between works): a token that could never be cancelled would let a
    hook meant to stop a library silently never run. In a worker *process* (a
    process pool, a Dask worker) the token works the same: the cancellation comes
    over the job's channel.
    """
    token: CancelToken | None = getattr(_local, "token", None)
    if token is None:
        raise RuntimeError(
            "tsfn.cancel_token() must be called inside a worker (an AsyncWork's execute "
            f"or a stream function), on its thread; not on {threading.current_thread().name!r}"
        )
    return token


def run_with_flag(flag: CancelFlag, func: Callable[[], R]) -> R:
    """Run `func()` with `flag` bound to this thread for `cancelled()` and `cancel_token()`.

    When `func` returns (or raises), the hooks the flag has not triggered are dropped,
    and the triggered ones are waited for (`CancelFlag.end`).
    """
    previous = getattr(_local, "flag", None), getattr(_local, "token", None)
    _local.flag, _local.token = flag, CancelToken(flag)
    try:
        return func()
    finally:
        _local.flag, _local.token = previous
        flag.end()
