"""Thread and loop helpers shared by the test modules (one copy, so a fix lands everywhere)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import trio
from _loops import asyncio_run

import tsfn
from tsfn._running import running_port

T = TypeVar("T")

# Generous: a correct test never waits this long, a broken one fails instead of hanging.
WAIT = 10.0

R = TypeVar("R")

# The `anyio_backend` fixture's value: ("asyncio", {"use_uvloop": ...}) or ("trio", {}).
Backend = tuple[str, dict[str, Any]]


class Boom(Exception):
    """The fault the tests inject; nothing in tsfn raises it."""


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


def start_threads(targets: Iterable[Callable[[], object]]) -> list[threading.Thread]:
    """Start a plain thread per target; what one raises reaches pytest's thread check."""
    threads = [threading.Thread(target=target) for target in targets]
    for thread in threads:
        thread.start()
    return threads


def join_all(threads: Iterable[threading.Thread], wait: float = WAIT) -> None:
    """Join every thread, failing (not hanging) if any runs past `wait` seconds in all."""
    threads = list(threads)
    deadline = time.monotonic() + wait
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert [t.name for t in threads if t.is_alive()] == [], "threads hung"


async def join_all_from_loop(threads: Iterable[threading.Thread], wait: float = WAIT) -> None:
    """`join_all` without blocking the loop, which the threads may need."""
    await anyio.to_thread.run_sync(join_all, list(threads), wait)


async def result_of(future: concurrent.futures.Future[T]) -> T:
    """Await a `concurrent.futures.Future` on any loop (`asyncio.wrap_future` needs
    asyncio): a worker thread waits for it, failing (not hanging) after WAIT."""
    return await anyio.to_thread.run_sync(future.result, WAIT)


def set_from_worker(event: _Settable) -> Callable[[], None]:
    """A function a worker thread calls to set `event` (an `anyio.Event`, or the running
    loop's own) on the loop: the only safe way, on every loop."""
    port = running_port("set_from_worker")

    def signal() -> None:
        port.call_soon_threadsafe(event.set)

    return signal


def run_on(backend: Backend, main: Callable[..., Awaitable[R]], *args: Any) -> R:
    """`tsfn.run(main, *args)` on a new loop of the kind `backend` names (a sync test
    that takes `anyio_backend` runs it on each loop, trio included)."""
    name, options = backend
    return tsfn.run(main, *args, backend=name, backend_options=options)


def loop_factory_of(backend: Backend) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the asyncio loop an asyncio `backend` names (uvloop's or asyncio's)."""
    if backend[1].get("use_uvloop"):
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_to_end(backend: Backend, main: Callable[[], Awaitable[R]]) -> R:
    """Run `main()` on a new loop of the kind `backend` names to the end, as the loop's
    own runner does (asyncio.run's steps, or `trio.run`)."""
    if backend[0] == "trio":
        return trio.run(main)
    return asyncio_run(main(), loop_factory_of(backend))  # type: ignore[arg-type]


class _Settable(Protocol):
    def set(self) -> object: ...


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition()` holds.

    Polled, because other threads make it true; what the test then checks does not
    depend on how long this took.
    """
    with anyio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - set by threads, which cannot set an Event
            await anyio.sleep(0.001)


def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition another thread makes true (no event exists to wait on)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def blocked_callers(fn: tsfn.ThreadsafeFunction[Any]) -> int:
    """tsfn's own count of callers waiting for room (white-box).

    The only way to tell a thread that is inside the wait from one about to enter it.
    """
    return fn._life.waiters


@contextlib.contextmanager
def loop_errors(loop: asyncio.AbstractEventLoop | None = None) -> Iterator[list[dict[str, Any]]]:
    """Collect the errors tsfn reports, as dicts with "message" and "exception".

    Given an asyncio `loop` (or on the running asyncio loop): what reaches the loop's
    exception handler. On trio, which has no such handler: what tsfn logs to the
    `tsfn` logger (see docs/trio.md).
    """
    if loop is None and asyncio_loop() is None:
        with _logged_errors() as logged:
            yield logged
        return
    loop = loop or asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


def asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None (on trio)."""
    return asyncio._get_running_loop()


@contextlib.contextmanager
def _logged_errors() -> Iterator[list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            exc = record.exc_info[1] if record.exc_info else None
            errors.append({**record.__dict__, "message": record.getMessage(), "exception": exc})

    handler = Collect(logging.ERROR)
    logger = logging.getLogger("tsfn")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)


def return_with_a_consumer_running(stream: tsfn.Stream[Any, Any]) -> None:
    """asyncio.run a main that returns while a task consumes `stream`: the loop's
    shutdown cancels that task, with the stream's worker still emitting."""

    async def main() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async with stream as items:
                async for _ in items:
                    first.set()

        task = asyncio.ensure_future(consume())  # left running: the shutdown ends it
        await asyncio.wait_for(first.wait(), WAIT)
        assert not task.done()

    asyncio.run(main())


async def read_all(
    stream: tsfn.Stream[Any, Any], got: list[Any], after_three: Callable[[], object] = lambda: None
) -> None:
    """Reads every item into `got`, calling `after_three` (in a worker thread: it may
    block, as a manager's or a Dask client's call does) once three have come."""
    async with stream as items:
        async for item in items:
            got.append(item)
            if len(got) == 3:
                await anyio.to_thread.run_sync(after_three)


def remote_threads() -> list[str]:
    """The threads tsfn runs in this process for remote streams, still alive."""
    return [t.name for t in threading.enumerate() if t.name in ("tsfn-relay", "tsfn-hub")]
