"""Thread and loop helpers shared by the test modules (one copy, so a fix lands everywhere)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# Generous: a correct test never waits this long, a broken one fails instead of hanging.
WAIT = 10.0


class Worker(threading.Thread):
    """A thread that keeps what its target returned or raised, for the test to check."""

    def __init__(self, target: Callable[[], object], name: str = "tsfn-test-worker") -> None:
        super().__init__(name=name)
        self._work = target
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        """Join, failing the test (not hanging it) if the thread is stuck."""
        self.join(WAIT)
        assert not self.is_alive(), f"{self.name} is still running"


def start(target: Callable[[], object], name: str = "tsfn-test-worker") -> Worker:
    worker = Worker(target, name)
    worker.start()
    return worker


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition another thread makes true (no event exists to wait on)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


@contextlib.contextmanager
def loop_errors(loop: asyncio.AbstractEventLoop) -> Iterator[list[dict[str, Any]]]:
    """Collect what reaches the loop's exception handler."""
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)
