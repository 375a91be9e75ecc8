"""`tsfn.cancelled()`: how a worker thread learns that nobody wants its result any more.

A worker (an AsyncWork's `execute`, a `stream` function) runs with a `CancelFlag`
bound to its thread. The loop side sets the flag when the awaiting task is cancelled
or the stream's consumer leaves; the worker polls `cancelled()` at its own pace, as
with anyio's `from_thread.check_cancelled`. Polling, not raising, because Python
cannot interrupt a thread safely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["CancelFlag", "cancelled", "run_with_flag"]

R = TypeVar("R")

_local = threading.local()


class CancelFlag:
    """A one-way flag. Setting and reading a bool attribute needs no lock: a reader
    sees the old or the new value, and either is fine for a poll."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False

    def set(self) -> None:
        self.is_set = True


def cancelled() -> bool:
    """True inside a worker whose result is no longer wanted.

    In an `AsyncWork`'s `execute`: the task awaiting the work was cancelled after
    `execute` had started. In a `stream` function: the consumer has left the
    `async with` block (or its task was cancelled), so the next `emit` raises
    `Closing`. Outside such a worker, and in a worker running in another process,
    it is always False.
    """
    flag: CancelFlag | None = getattr(_local, "flag", None)
    return flag is not None and flag.is_set


def run_with_flag(flag: CancelFlag, func: Callable[[], R]) -> R:
    """Run `func()` with `flag` bound to this thread for `cancelled()`."""
    previous = getattr(_local, "flag", None)
    _local.flag = flag
    try:
        return func()
    finally:
        _local.flag = previous
