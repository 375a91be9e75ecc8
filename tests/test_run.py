"""tsfn.run: asyncio.run with Node's event-loop liveness.

After `main` returns, the loop keeps running while a referenced ThreadsafeFunction is
open or a queued AsyncWork has not completed (Node's uv_ref), then aborts what is
still open. Ported cases: U1 (an unref'd function that is never released does not
keep the loop alive) and U2 (unref then ref: it does again).

To show that `run` really waited, the work that closes a function is held back until
a loop callback scheduled by `main` runs, which can only happen after `main` has
returned; had `run` not waited, the function would have been aborted instead.

The liveness tests run on every loop (`anyio_backend`: asyncio, uvloop, trio), through
`tsfn.run`'s anyio form; those of asyncio's own options (`loop_factory`, `debug`) and
of the steps asyncio.run takes take `loop_factory` and stay on asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _helpers import Backend, run_on
from _loops import LoopFactory

import tsfn
from tsfn import AsyncWork, Closing, Status, ThreadsafeFunction
from tsfn._running import running_port

pytestmark = pytest.mark.timeout(20)


class AfterMain:
    """A `threading.Event` released by a loop callback that runs only after `main` returned."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.main_returned = False
        self.released_after_main = False

    def schedule(self) -> None:
        """Call in `main`: the callback runs on a later loop iteration than main's return."""
        running_port("AfterMain").call_soon(self._release)

    def _release(self) -> None:
        self.released_after_main = self.main_returned
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(timeout=10), "never released"


class Recorder:
    """call_js and finalizer hooks that record what they were given."""

    def __init__(self) -> None:
        self.delivered: list[object] = []
        self.discarded: list[object] = []
        self.bad_discards: list[tuple[object, object]] = []
        self.finalized: list[object] = []

    def call_js(
        self,
        loop: asyncio.AbstractEventLoop | None,
        callback: Callable[[Any], object] | None,
        context: object,
        data: object,
    ) -> None:
        if loop is None:
            self.discarded.append(data)
            if callback is not None or context != "ctx":
                self.bad_discards.append((callback, context))
        else:
            self.delivered.append(data)

    def finalizer(self, context: object) -> None:
        self.finalized.append(context)


def test_run_returns_mains_result(anyio_backend: Backend) -> None:
    async def main(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 2

    assert run_on(anyio_backend, main, 21) == 42


def test_run_returns_the_result_of_mains_coroutine(loop_factory: LoopFactory) -> None:
    """The coroutine form, `run(main())`, is asyncio's."""

    async def main(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert tsfn.run(main(21), loop_factory=loop_factory) == 42


def test_run_uses_the_loop_factory(loop_factory: LoopFactory) -> None:
    """Asyncio only, as `loop_factory` is."""
    created: list[asyncio.AbstractEventLoop] = []

    def factory() -> asyncio.AbstractEventLoop:
        created.append(loop_factory())
        return created[-1]

    async def main() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = tsfn.run(main(), loop_factory=factory)
    assert created == [loop]
    assert loop.is_closed()


@pytest.mark.parametrize("debug", [True, False])
def test_run_sets_debug_mode(debug: bool) -> None:
    """Asyncio only, as `debug` is."""

    async def main() -> bool:
        return asyncio.get_running_loop().get_debug()

    assert tsfn.run(main(), debug=debug) is debug


async def _debug_mode() -> bool:
    return asyncio.get_running_loop().get_debug()


@pytest.mark.timeout(60)
def test_run_with_debug_none_keeps_the_debug_mode_the_environment_asks_for() -> None:
    """Issue 9, defect 11: on 3.10, `tsfn.run(main)` passed debug=False to asyncio.run,
    switching asyncio's debug mode off against PYTHONASYNCIODEBUG and -X dev. With
    `debug=None` the loop's debug mode is what asyncio.run would give. A child process,
    so that the environment asks for debug mode whatever this one was started with."""
    program = (
        "import asyncio, tsfn\n"
        "async def debug_mode(): return asyncio.get_running_loop().get_debug()\n"
        "print(tsfn.run(debug_mode()), asyncio.run(debug_mode()))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", program],
        env={**os.environ, "PYTHONASYNCIODEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    assert child.stdout.split() == ["True", "True"], child.stdout + child.stderr


def test_run_with_debug_none_keeps_a_factory_loops_own_debug_mode(
    loop_factory: LoopFactory,
) -> None:
    """Issue 9, defect 11, with a loop factory: `debug=None` leaves the new loop's debug
    mode as the loop set it from the environment."""
    fresh = loop_factory()
    try:
        expected = fresh.get_debug()
    finally:
        fresh.close()
    assert tsfn.run(_debug_mode(), loop_factory=loop_factory) is expected


def test_run_calls_an_async_function_with_its_args(loop_factory: LoopFactory) -> None:
    """anyio's form, beside the coroutine form: `run(main, *args)` calls it on the loop
    that `backend_options`' `loop_factory` (an asyncio option) makes."""

    async def main(a: int, b: int) -> tuple[int, bool]:
        return a + b, isinstance(asyncio.get_running_loop(), type(probe))

    probe = loop_factory()
    probe.close()
    assert tsfn.run(main, 1, 2, backend_options={"loop_factory": loop_factory}) == (3, True)


def test_run_waits_for_a_referenced_function_to_close(anyio_backend: Backend) -> None:
    after_main = AfterMain()
    hooks = Recorder()
    producer_errors: list[BaseException] = []
    fns: list[ThreadsafeFunction[int]] = []

    def producer(fn: ThreadsafeFunction[int]) -> None:
        try:
            after_main.wait()
            for i in range(5):
                fn.call(i)
            fn.release()
        except BaseException as exc:
            producer_errors.append(exc)

    async def main() -> str:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(
            call_js=hooks.call_js, context="ctx", finalizer=hooks.finalizer
        )
        fns.append(fn)
        threading.Thread(target=producer, args=(fn,), name="gated-producer").start()
        after_main.schedule()
        after_main.main_returned = True
        return "main done"

    assert run_on(anyio_backend, main) == "main done"
    assert after_main.released_after_main
    assert producer_errors == []
    assert hooks.delivered == [0, 1, 2, 3, 4]
    assert hooks.discarded == []
    assert hooks.finalized == ["ctx"]
    assert fns[0].closed


def test_run_waits_for_a_queued_async_work_to_complete(anyio_backend: Backend) -> None:
    after_main = AfterMain()
    completions: list[tuple[Status, object]] = []

    def execute(data: str) -> str:
        after_main.wait()
        return data.upper()

    works: list[AsyncWork[str, str]] = []

    async def main() -> None:
        work = AsyncWork(execute, lambda status, data: completions.append((status, data)), data="w")
        works.append(work.queue())  # queued, never awaited
        after_main.schedule()
        after_main.main_returned = True

    run_on(anyio_backend, main)
    assert after_main.released_after_main
    assert completions == [(Status.OK, "w")]
    assert works[0].status is Status.OK


@pytest.mark.parametrize("switches", [["unref"], ["ref", "ref", "unref"], ["unref", "unref"]])
def test_U1_run_does_not_wait_for_an_unrefd_function_and_aborts_it(
    anyio_backend: Backend, switches: list[str]
) -> None:
    """Not counted, like uv_ref: one unref() after any number of ref() lets run exit.
    The function is then aborted: every item it accepted goes to call_js with
    loop=None, a producer blocked on the full queue wakes with Closing, and the
    finalizer runs once."""
    hooks = Recorder()
    accepted: list[int] = []
    producer_errors: list[BaseException] = []
    fns: list[ThreadsafeFunction[int]] = []
    producing = threading.Event()

    def producer(fn: ThreadsafeFunction[int]) -> None:
        try:
            for i in range(1_000_000):
                fn.call(i)  # blocks after the first item: nobody drains before the abort
                accepted.append(i)
                producing.set()
        except BaseException as exc:
            producer_errors.append(exc)

    threads: list[threading.Thread] = []

    async def main() -> None:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(
            call_js=hooks.call_js,
            context="ctx",
            finalizer=hooks.finalizer,
            max_queue_size=1,
        )
        fns.append(fn)
        for switch in switches:
            getattr(fn, switch)()
        threads.append(threading.Thread(target=producer, args=(fn,), name="never-releases"))
        threads[0].start()
        # Without yielding to the loop, so nothing can be delivered before run ends.
        assert producing.wait(timeout=10)

    run_on(anyio_backend, main)
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()
    assert len(producer_errors) == 1
    assert isinstance(producer_errors[0], Closing)
    assert hooks.delivered == []
    assert hooks.discarded == accepted == [0]
    assert hooks.bad_discards == []
    assert hooks.finalized == ["ctx"]
    assert fns[0].closed


@pytest.mark.parametrize("switches", [["unref", "ref"], ["unref", "unref", "ref"]])
def test_U2_ref_after_unref_makes_run_wait_again(
    anyio_backend: Backend, switches: list[str]
) -> None:
    after_main = AfterMain()
    hooks = Recorder()

    def producer(fn: ThreadsafeFunction[int]) -> None:
        after_main.wait()
        fn.call(1)
        fn.release()

    threads: list[threading.Thread] = []

    async def main() -> None:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(
            call_js=hooks.call_js, context="ctx", finalizer=hooks.finalizer
        )
        for switch in switches:
            getattr(fn, switch)()
        threads.append(threading.Thread(target=producer, args=(fn,)))
        threads[0].start()
        after_main.schedule()
        after_main.main_returned = True

    run_on(anyio_backend, main)
    threads[0].join()
    assert after_main.released_after_main
    assert hooks.delivered == [1]
    assert hooks.finalized == ["ctx"]


def test_unref_after_main_returned_lets_run_finish(anyio_backend: Backend) -> None:
    # ref/unref switch a function in and out of the count at any time: here from a
    # loop callback while run is already waiting for it.
    hooks = Recorder()

    async def main() -> None:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(
            call_js=hooks.call_js, context="ctx", finalizer=hooks.finalizer
        )
        running_port("test").call_soon(fn.unref)

    run_on(anyio_backend, main)
    assert hooks.finalized == ["ctx"]


def test_main_raising_propagates_and_open_functions_are_aborted(
    anyio_backend: Backend,
) -> None:
    """The loop may still deliver a little while it shuts down, so the check is the
    contract itself: every accepted item is delivered or discarded exactly once, in
    order, before the finalizer; the producer wakes with Closing."""
    hooks = Recorder()
    accepted: list[int] = []
    producer_errors: list[BaseException] = []
    producing = threading.Event()
    threads: list[threading.Thread] = []
    fns: list[ThreadsafeFunction[int]] = []

    def producer(fn: ThreadsafeFunction[int]) -> None:
        try:
            for i in range(1_000_000):
                fn.call(i)
                accepted.append(i)
                producing.set()
        except BaseException as exc:
            producer_errors.append(exc)

    async def main() -> None:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(
            call_js=hooks.call_js,
            context="ctx",
            finalizer=hooks.finalizer,
            max_queue_size=1,
        )
        fns.append(fn)
        threads.append(threading.Thread(target=producer, args=(fn,)))
        threads[0].start()
        assert producing.wait(timeout=10)
        raise LookupError("main failed")

    with pytest.raises(LookupError, match="main failed"):
        run_on(anyio_backend, main)
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()
    assert [type(e) for e in producer_errors] == [Closing]
    assert accepted
    assert hooks.delivered + hooks.discarded == accepted
    assert hooks.bad_discards == []
    assert hooks.finalized == ["ctx"]
    assert fns[0].closed


def test_main_raising_cancels_a_work_that_has_not_started(anyio_backend: Backend) -> None:
    completions: list[Status] = []
    ran: list[object] = []
    gate = threading.Event()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(gate.wait)  # the only worker is busy: the work stays queued

        async def main() -> None:
            AsyncWork(
                ran.append, lambda status, _: completions.append(status), executor=pool
            ).queue()
            raise LookupError("main failed")

        try:
            with pytest.raises(LookupError):
                run_on(anyio_backend, main)
        finally:
            gate.set()
    assert ran == []
    assert completions == [Status.CANCELLED]


# -- what asyncio.run does, tsfn.run does -------------------------------------------------
#
# On 3.10, which has no asyncio.Runner (and whose asyncio.run takes no loop factory),
# tsfn takes asyncio.run's steps itself (tsfn/_asyncio.py: asyncio_run). Defect 11 of
# issue 9 was one step done differently there; the two below were steps left out.


def test_run_reports_a_task_that_fails_while_it_is_cancelled_at_the_end(
    loop_factory: LoopFactory,
) -> None:
    """Sibling of issue 9, defect 11: asyncio.run cancels the tasks left when `main`
    returns and reports to the loop's handler any that raised instead of ending
    cancelled. tsfn.run must not drop them silently. Asyncio only: a trio task cannot
    outlive `main`."""
    reports: list[str] = []
    keep: list[asyncio.Task[None]] = []

    async def fails_when_cancelled(parked: asyncio.Event) -> None:
        try:
            parked.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise LookupError("raised while being cancelled") from None

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reports.append(context["message"])
        )
        parked = asyncio.Event()
        keep.append(asyncio.ensure_future(fails_when_cancelled(parked)))
        await parked.wait()

    tsfn.run(main(), loop_factory=loop_factory)
    assert reports == ["unhandled exception during asyncio.run() shutdown"]


def test_run_with_a_loop_factory_leaves_the_threads_current_loop_alone(
    loop_factory: LoopFactory,
) -> None:
    """Sibling of issue 9's defects 2 and 11: state that is not tsfn's stays as it was.
    asyncio.run (3.12+) and asyncio.Runner (3.11+) with a loop factory never make their
    loop the thread's current one, so a loop the caller made current stays current.
    Asyncio only: the thread's current loop is asyncio's state."""
    mine = asyncio.new_event_loop()
    asyncio.set_event_loop(mine)
    try:
        tsfn.run(_debug_mode(), loop_factory=loop_factory)
        assert asyncio.get_event_loop_policy().get_event_loop() is mine
    finally:
        asyncio.set_event_loop(None)
        mine.close()
