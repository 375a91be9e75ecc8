"""tsfn.cancel_token(): cancellation that blocking code can wait for or hook.

The worker in these tests blocks the way a library's loop does (paho's
`loop_forever`, a watchdog Observer's `join`, a C thread): on a `threading.Event`
that only a cancellation hook sets, never polling. Each test orders its threads with
events; where a test checks that something waited for something else, the waiting
side records what it saw, so the check does not depend on timing.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

import tsfn
from tsfn._cancel import CancelFlag, run_with_flag
from tsfn._running import running_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

Emit = Callable[[int], None]


class Library:
    """Stands for a library whose loop holds the worker's thread until `stop()`."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self._stopped = threading.Event()
        self.stopped_on: list[str] = []  # the threads stop() was called on

    def run_forever(self) -> None:
        self.running.set()
        self._stopped.wait()

    def stop(self) -> None:
        self.stopped_on.append(threading.current_thread().name)
        self._stopped.set()


async def wait_for_thread_event(event: threading.Event) -> None:
    """Await a threading.Event without blocking the loop."""
    assert await anyio.to_thread.run_sync(event.wait, 10)


async def on_the_default_pool(func: Callable[[], object]) -> object:
    """Run `func` on the pool an AsyncWork without `executor=` runs on (asyncio's
    default executor, trio's thread cache): white-box, that pool is the point."""
    return await running_port("on_the_default_pool").run_in_worker(func)


# -- where a token exists ---------------------------------------------------------------


async def test_cancel_token_outside_a_worker_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match=r"inside a worker .*not on 'MainThread'"):
        tsfn.cancel_token()  # the loop thread

    errors: list[BaseException] = []

    def in_own_thread() -> None:
        try:
            tsfn.cancel_token()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_own_thread, name="mine")
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "'mine'" in str(errors[0])
    # A pool thread that runs no tsfn work has none either.
    with pytest.raises(RuntimeError):
        await on_the_default_pool(tsfn.cancel_token)


async def test_a_pool_thread_has_no_token_after_its_work() -> None:
    def execute(_: object) -> bool:
        return tsfn.cancel_token().cancelled

    assert await tsfn.AsyncWork(execute) is False
    with pytest.raises(RuntimeError):
        await on_the_default_pool(tsfn.cancel_token)


def token_state(_: object) -> tuple[bool, int]:
    token = tsfn.cancel_token()
    return token.cancelled, os.getpid()


async def test_a_process_pool_worker_has_a_token_that_is_not_cancelled() -> None:
    # Until cancellation crosses processes, the token there behaves like
    # tsfn.cancelled() there: it exists, and it is False.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        cancelled, pid = await tsfn.AsyncWork(token_state, executor=pool)
    assert cancelled is False
    assert pid != os.getpid()


# -- hooks stop a blocked library -------------------------------------------------------


async def test_a_hook_stops_a_blocked_asyncwork_when_its_awaiting_task_is_cancelled() -> None:
    library = Library()
    seen: list[object] = []

    def execute(_: object) -> str:
        token = tsfn.cancel_token()
        seen.append(token.cancelled)
        with token.on_cancel(library.stop):
            library.run_forever()  # no polling: only the hook ends this
        seen.append(token.cancelled)
        seen.append(tsfn.cancelled())
        return "stopped"

    work = tsfn.AsyncWork(execute)
    awaiting = anyio.CancelScope()
    interrupted: list[bool] = []

    async def await_the_work() -> None:
        with awaiting:
            await work
        interrupted.append(awaiting.cancelled_caught)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(await_the_work)
        await wait_for_thread_event(library.running)
        awaiting.cancel()
    assert interrupted == [True]
    assert await work == "stopped"
    assert seen == [False, True, True]
    # Once, on the hooks thread: not the loop's, not the worker's.
    assert library.stopped_on == ["tsfn-cancel-hooks"]


async def test_a_hook_stops_a_blocked_stream_worker_when_the_consumer_leaves() -> None:
    library = Library()

    def worker(emit: Emit) -> None:
        emit(1)
        with tsfn.cancel_token().on_cancel(library.stop):
            library.run_forever()

    async with tsfn.stream(worker) as items:
        async for item in items:
            assert item == 1
            await wait_for_thread_event(library.running)
            break
    # The block exited, so the worker returned: the hook stopped the library.
    assert library.stopped_on == ["tsfn-cancel-hooks"]


async def test_wait_returns_true_once_the_consumer_leaves() -> None:
    waited: list[bool] = []
    ready = threading.Event()

    def worker(emit: Emit) -> None:
        token = tsfn.cancel_token()
        waited.append(token.wait(timeout=0))  # not cancelled yet: at once, False
        ready.set()
        waited.append(token.wait())

    async with tsfn.stream(worker):
        await wait_for_thread_event(ready)
    assert waited == [False, True]


async def test_a_triggered_hook_runs_even_if_the_worker_returns_at_once() -> None:
    # The worker wakes from wait() as soon as the flag is set, usually before the
    # hooks thread has started: its return must wait for the hook, not drop it.
    for _ in range(20):
        ran: list[str] = []

        def worker(emit: Emit, ran: list[str] = ran) -> None:
            token = tsfn.cancel_token()
            token.on_cancel(lambda: ran.append("hook"))
            token.wait()

        async with tsfn.stream(worker):
            pass
        assert ran == ["hook"]


async def test_a_hook_may_block_the_loop_keeps_running_meanwhile() -> None:
    # The hook waits for something only the loop does: on the loop thread it would
    # deadlock; on the hooks thread it returns once the loop has done it.
    loop_done = threading.Event()
    hook_started = threading.Event()
    order: list[str] = []

    def hook() -> None:
        hook_started.set()
        assert loop_done.wait(10)
        order.append("hook returned")

    def worker(emit: Emit) -> None:
        token = tsfn.cancel_token()
        token.on_cancel(hook)
        token.wait()

    async def leave() -> None:
        async with tsfn.stream(worker):
            pass

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(leave)
        await wait_for_thread_event(hook_started)
        order.append("loop ran")
        running_port("test").call_soon(loop_done.set)  # a callback the loop runs
    assert order == ["loop ran", "hook returned"]


# -- the hook's life: once, in order, removable ------------------------------------------


def run_worker(body: Callable[[CancelFlag], object]) -> None:
    """Run `body(flag)` as a worker on a thread of its own, the way tsfn runs one."""
    flag = CancelFlag()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_with_flag(flag, lambda: body(flag))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="worker")
    thread.start()
    thread.join(timeout=15)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


def cancel_and_wait_for_the_hooks(
    flag: CancelFlag, token: tsfn.CancelToken, order: list[str]
) -> None:
    """Register a last hook that records "last", cancel, and wait until it has run
    (the hooks before it have run by then: one thread runs them in order)."""
    ran = threading.Event()

    def last() -> None:
        order.append("last")
        ran.set()

    token.on_cancel(last)
    flag.set()
    flag.set()  # idempotent: the hooks still run once
    assert ran.wait(10)


def test_hooks_run_once_in_registration_order_even_if_set_twice() -> None:
    order: list[str] = []

    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        for name in "abc":
            token.on_cancel(lambda name=name: order.append(name))  # type: ignore[misc]
        cancel_and_wait_for_the_hooks(flag, token, order)  # sets the flag twice

    run_worker(body)
    assert order == ["a", "b", "c", "last"]


def test_remove_before_cancellation_means_never_and_says_so_once() -> None:
    order: list[str] = []

    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        removed = token.on_cancel(lambda: order.append("removed"))
        with token.on_cancel(lambda: order.append("scoped")):
            pass  # leaving the block removes it
        assert removed.remove() is True
        assert removed.remove() is False
        cancel_and_wait_for_the_hooks(flag, token, order)

    run_worker(body)
    assert order == ["last"]


def test_a_hook_removed_while_an_earlier_hook_runs_never_runs() -> None:
    order: list[str] = []
    later: list[tsfn.CancelHook] = []

    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        # The first hook removes the second before the hooks thread gets to it.
        token.on_cancel(lambda: order.append(f"first; removed: {later[0].remove()}"))
        later.append(token.on_cancel(lambda: order.append("second")))
        cancel_and_wait_for_the_hooks(flag, token, order)

    run_worker(body)
    assert order == ["first; removed: True", "last"]


def test_on_cancel_when_already_cancelled_runs_at_once_in_the_caller() -> None:
    seen: list[object] = []

    def body(flag: CancelFlag) -> None:
        flag.set()
        token = tsfn.cancel_token()
        hook = token.on_cancel(lambda: seen.append(threading.current_thread().name))
        seen.append("returned")
        assert hook.remove() is False  # it has run
        with pytest.raises(ZeroDivisionError):
            token.on_cancel(lambda: 1 / 0)  # its exception propagates to the caller

    run_worker(body)
    assert seen == ["worker", "returned"]


class GatedHook:
    """A hook that, once started, waits for `release()`: the worker lets it go and then
    at once does what must wait for it; `finished` says whether it had."""

    def __init__(self) -> None:
        self._started, self._gate = threading.Event(), threading.Event()
        self.finished = False

    def __call__(self) -> None:
        self._started.set()
        assert self._gate.wait(10)
        self.finished = True

    def release_once_started(self) -> None:
        assert self._started.wait(10)
        self._gate.set()


def test_remove_waits_for_a_hook_that_is_running(tiny_switch_interval: None) -> None:
    hook = GatedHook()
    seen_by_remove: list[bool] = []

    def body(flag: CancelFlag) -> None:
        registered = tsfn.cancel_token().on_cancel(hook)
        flag.set()
        hook.release_once_started()
        seen_by_remove.append(registered.remove())  # returns once the hook has
        seen_by_remove.append(hook.finished)

    run_worker(body)
    assert seen_by_remove == [False, True]


def test_a_hook_may_remove_itself() -> None:
    results: list[bool] = []
    hooks: list[tsfn.CancelHook] = []
    done = threading.Event()

    def hook() -> None:
        results.append(hooks[0].remove())  # would wait for itself if it did not know
        done.set()

    def body(flag: CancelFlag) -> None:
        hooks.append(tsfn.cancel_token().on_cancel(hook))
        flag.set()
        assert done.wait(10)

    run_worker(body)
    assert results == [False]


def test_the_worker_returning_waits_for_a_running_hook(tiny_switch_interval: None) -> None:
    hook = GatedHook()

    def body(flag: CancelFlag) -> None:
        tsfn.cancel_token().on_cancel(hook)
        flag.set()
        hook.release_once_started()  # and return at once: run_with_flag waits for it

    flag = CancelFlag()
    run_with_flag(flag, lambda: body(flag))
    assert hook.finished  # already, when run_with_flag returned


def test_hooks_left_when_the_worker_returns_never_run() -> None:
    ran: list[str] = []
    kept: list[tuple[CancelFlag, tsfn.CancelToken]] = []

    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        token.on_cancel(lambda: ran.append("hook"))
        kept.append((flag, token))

    run_worker(body)
    flag, token = kept[0]
    before = threading.active_count()
    flag.set()  # say, a stream's consumer leaving after its worker returned
    assert threading.active_count() == before  # no hooks thread: nothing to run
    assert ran == []
    # The token outlives its work: it still reads, but takes no new hooks.
    assert token.cancelled is True
    assert token.wait(0) is True
    with pytest.raises(RuntimeError, match="after the worker returned"):
        token.on_cancel(lambda: None)


async def test_a_hook_left_registered_never_runs_after_its_stream_worker_returned() -> None:
    ran: list[str] = []

    def worker(emit: Emit) -> None:
        tsfn.cancel_token().on_cancel(lambda: ran.append("hook"))  # never removed
        emit(1)
        emit(2)

    async with tsfn.stream(worker, max_queue_size=0) as items:
        async for _ in items:
            break  # leaving early sets the flag: the worker may have returned already
    assert ran in ([], ["hook"])  # ran only if the worker was still running
    before = list(ran)

    # A worker that certainly returned first: its hook is dropped, the flag set later.
    returned = threading.Event()

    def quick(emit: Emit) -> None:
        tsfn.cancel_token().on_cancel(lambda: ran.append("late hook"))
        emit(1)
        returned.set()

    async with tsfn.stream(quick, max_queue_size=0) as items:
        async for _ in items:
            await wait_for_thread_event(returned)
            break
    assert ran == before


# -- exceptions and odd input ------------------------------------------------------------


@pytest.fixture
def excepthook_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", calls.append)
    return calls


def test_an_exception_from_a_hook_goes_to_threading_excepthook_and_the_next_hook_runs(
    excepthook_calls: list[Any],
) -> None:
    order: list[str] = []

    def failing() -> None:
        raise ValueError("the library refused to stop")

    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        token.on_cancel(failing)
        cancel_and_wait_for_the_hooks(flag, token, order)

    run_worker(body)
    assert order == ["last"]
    assert len(excepthook_calls) == 1
    args = excepthook_calls[0]
    assert args.exc_type is ValueError
    assert str(args.exc_value) == "the library refused to stop"
    assert args.exc_traceback is not None
    assert args.thread.name == "tsfn-cancel-hooks"


def test_hooks_run_in_the_setting_thread_if_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At interpreter shutdown (3.12+) Thread.start raises RuntimeError; set() must
    # still run the hooks (and not raise into the loop side).
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    ran_on: list[str] = []
    flag = CancelFlag()
    hook = flag.add_hook(lambda: ran_on.append(threading.current_thread().name))
    monkeypatch.setattr(threading.Thread, "start", refuse)
    flag.set()
    assert ran_on == [threading.current_thread().name]
    assert hook.remove() is False


def test_bad_arguments_name_the_argument() -> None:
    def body(flag: CancelFlag) -> None:
        token = tsfn.cancel_token()
        with pytest.raises(TypeError, match="callback must be a callable, got 42"):
            token.on_cancel(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout must be a number"):
            token.wait("1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be >= 0, got -1"):
            token.wait(-1)
        assert repr(token) == "<CancelToken cancelled=False>"

    run_worker(body)
