"""A hypothesis state machine drives one ThreadsafeFunction against a model of it.

Each rule runs on a real thread: three producer threads, each fed commands through
its own `queue.Queue`, make the calls (call, call_nowait, timed calls, submit,
acquire, release, abort), and the loop thread makes the loop-only ones (ref, unref,
calls from the loop thread). After every step the function's state and everything
it handed out are compared with the model: no item delivered twice or lost, each
thread's order kept, the finalizer exactly once and last, `Closing`, `QueueFull` and
`WouldDeadlock` exactly when the model says.

Why the machine drives the loop. The loop runs in its own thread, under `tsfn.run`
(so that ref/unref have an effect the teardown can check), but between steps that
thread is parked: its main coroutine blocks in `queue.Queue.get()` waiting for the
next command, so no drain can run behind the machine's back. Whether a bounded queue
is full is then a fact the model knows, not a race, and every outcome is exact. A
`drain` rule lets the loop run until it is idle; a blocking call on a full queue is
a rule of its own that drains while the caller waits. The racing counterparts of
these scenarios, with the loop running free, are in test_races.py.

The machine runs on each loop (`anyio_backend`): asyncio's, uvloop and trio, whose
run blocks in `get()` just as well.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio.lowlevel
import pytest
from _helpers import WAIT, Backend, run_on
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import tsfn
from tsfn._running import running_port

pytestmark = pytest.mark.timeout(120)

Item = tuple[int, int]  # (the thread that sent it, its sequence number there)
Event = tuple[str, Any]  # ("delivered", item) / ("discarded", item) / ("finalizer", ctx)

SIZES = st.sampled_from([0, 1, 2, 3])  # max_queue_size: unbounded, or tiny
THREADS = st.integers(1, 3)  # initial_thread_count
WORKERS = 3
CONTEXT = "context"


def _ok(action: Callable[[], object]) -> Callable[[], str]:
    """`action` as a job that returns "ok" when it does not raise."""

    def run() -> str:
        action()
        return "ok"

    return run


class CommandThread:
    """A real thread that runs the commands it is sent, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._replies: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name=name)
        self.thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._replies.put((True, job()))
            except BaseException as exc:
                self._replies.put((False, exc))

    def start(self, job: Callable[[], object]) -> None:
        self._jobs.put(job)

    def result(self) -> Any:
        """The started job's return value; raises what it raised."""
        ok, value = self._replies.get(timeout=WAIT)
        if not ok:
            raise value
        return value

    def do(self, job: Callable[[], object]) -> Any:
        self.start(job)
        return self.result()

    def outcome(self, job: Callable[[], object]) -> object:
        """What `job` returned, or the type of exception it raised."""
        try:
            return self.do(job)
        except Exception as exc:
            return type(exc)

    def stop(self) -> None:
        self._jobs.put(None)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


class LoopThread:
    """An event loop under `tsfn.run` in its own thread, parked between commands."""

    def __init__(self, backend: Backend) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._replies: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._backend = backend
        self.thread = threading.Thread(target=self._serve, name="loop")
        self.thread.start()

    def _serve(self) -> None:
        run_on(self._backend, self._main)

    async def _main(self) -> None:
        # Blocking the loop thread in get() is the point: nothing runs meanwhile.
        while (job := self._jobs.get()) is not None:
            try:
                result = job()
                if inspect.iscoroutine(result):
                    result = await result
                self._replies.put((True, result))
            except BaseException as exc:
                self._replies.put((False, exc))

    def do(self, job: Callable[[], object]) -> Any:
        self._jobs.put(job)
        ok, value = self._replies.get(timeout=WAIT)
        if not ok:
            raise value
        return value

    def outcome(self, job: Callable[[], object]) -> object:
        try:
            return self.do(job)
        except Exception as exc:
            return type(exc)

    def end_main(self) -> None:
        """Let `main` return: from now on tsfn.run runs the loop until nothing holds it."""
        self._jobs.put(None)


class Model:
    """What the function's state must be: pure bookkeeping, no threads."""

    def __init__(self, max_queue_size: int, threads: int, call_js: bool) -> None:
        self.max_queue_size = max_queue_size
        self.threads = threads
        self.call_js = call_js  # discards are observable only through call_js
        self.queued: list[Item] = []
        self.log: list[Event] = []
        self.closing = False
        self.aborted = False
        self.finalized = False
        self.referenced = True

    @property
    def full(self) -> bool:
        return 0 < self.max_queue_size <= len(self.queued)

    def expect_call(self, *, block: bool) -> type[Exception] | None:
        """The exception a call must raise now, or None if it must be accepted."""
        if self.closing:
            return tsfn.Closing
        if self.full and not block:
            return tsfn.QueueFull
        return None

    def drained(self) -> None:
        """The loop ran until idle."""
        if self.finalized:
            return
        if self.aborted:
            if self.call_js:
                self.log += [("discarded", item) for item in self.queued]
        else:
            self.log += [("delivered", item) for item in self.queued]
        self.queued = []
        if self.closing:
            self.log.append(("finalizer", CONTEXT))
            self.finalized = True


def _open(machine: FunctionMachine) -> bool:
    """Rules for a function that is not finalized yet (after that: create_another)."""
    return not machine.model.finalized


def _accepting(machine: FunctionMachine) -> bool:
    """Rules that make calls: they have a rule of their own once closing
    (`call_while_closing`), so that a closing function does not crowd out the rest."""
    return not machine.model.closing


class FunctionMachine(RuleBasedStateMachine):
    backend: Backend = ("asyncio", {})  # a subclass per loop kind sets it

    def __init__(self) -> None:
        super().__init__()
        self.loop = LoopThread(type(self).backend)
        self.workers = [CommandThread(f"producer-{w}") for w in range(WORKERS)]
        self.sent = [0] * (WORKERS + 1)  # next sequence number per thread (+ the loop)
        self.log: list[Event] = []  # what the function actually did, in order
        self.futures: dict[Item, concurrent.futures.Future[Any]] = {}
        self.fn: tsfn.ThreadsafeFunction[Item] | None = None
        self.model = Model(0, 1, False)

    # -- the function under test and what it records -------------------------------------

    def _callback(self, item: Item) -> object:
        self.log.append(("delivered", item))
        if item[1] % 4 == 3:
            return self._later(item)  # an awaitable result: it runs as a task
        return ("result", item)

    async def _later(self, item: Item) -> object:
        await anyio.lowlevel.checkpoint()
        return ("result", item)

    def _call_js(
        self,
        loop: object,  # the asyncio loop, trio's token, or None
        callback: Callable[[Item], object] | None,
        _context: object,
        item: Item,
    ) -> object:
        if loop is None:
            self.log.append(("discarded", item))
            return None
        assert callback is not None
        return callback(item)

    @initialize(
        max_queue_size=SIZES,
        threads=THREADS,
        with_call_js=st.booleans(),
        on_loop_thread=st.booleans(),
    )
    def create(
        self, max_queue_size: int, threads: int, with_call_js: bool, on_loop_thread: bool
    ) -> None:
        self._create(max_queue_size, threads, with_call_js, on_loop_thread)

    @precondition(lambda self: self.model.finalized)
    @rule(
        max_queue_size=SIZES,
        threads=THREADS,
        with_call_js=st.booleans(),
        on_loop_thread=st.booleans(),
    )
    def create_another(
        self, max_queue_size: int, threads: int, with_call_js: bool, on_loop_thread: bool
    ) -> None:
        """The last one is closed (and was checked): go on with a new one, same threads."""
        self._create(max_queue_size, threads, with_call_js, on_loop_thread)

    def _create(
        self, max_queue_size: int, threads: int, with_call_js: bool, on_loop_thread: bool
    ) -> None:
        self.model = Model(max_queue_size, threads, with_call_js)
        self.log = []
        self.futures = {}

        def make(loop: Any = None) -> tsfn.ThreadsafeFunction[Item]:  # a loop or a token
            return tsfn.ThreadsafeFunction(
                self._callback,
                call_js=self._call_js if with_call_js else None,
                context=CONTEXT,
                max_queue_size=max_queue_size,
                initial_thread_count=threads,
                finalizer=lambda context: self.log.append(("finalizer", context)),
                loop=loop,
            )

        if on_loop_thread:
            self.fn = self.loop.do(make)
        else:  # created from another thread for a loop that is running (parked)
            running = self.loop.do(lambda: running_port("test_stateful").token)
            self.fn = make(running)

    # -- helpers -----------------------------------------------------------------------

    @property
    def f(self) -> tsfn.ThreadsafeFunction[Item]:
        assert self.fn is not None
        return self.fn

    def _next_item(self, thread: int) -> Item:
        item = (thread, self.sent[thread])
        self.sent[thread] += 1
        return item

    def _drain(self) -> None:
        async def until_idle() -> None:
            # Run the loop until every queued item is handed over and every task a
            # callback started is done (a few iterations; the cap only stops a bug
            # from spinning forever, and the invariants then report it).
            for _ in range(1000):
                await anyio.lowlevel.checkpoint()
                if not self.f.qsize() and (not self.model.closing or self.f.closed):
                    break
            for _ in range(5):
                await anyio.lowlevel.checkpoint()

        self.loop.do(until_idle)
        self.model.drained()

    def _accepted(self, item: Item, outcome: object) -> None:
        expected = self.model.expect_call(block=False)
        assert outcome is (expected or "ok"), f"{item}: expected {expected}, got {outcome}"
        if expected is None:
            self.model.queued.append(item)

    # -- rules: producers on their own threads -------------------------------------------

    @precondition(_accepting)
    @rule(w=st.integers(0, WORKERS - 1), how=st.sampled_from(["nowait", "timeout0", "timed"]))
    def call_without_waiting(self, w: int, how: str) -> None:
        """A call that cannot wait (the loop is parked): accepted, QueueFull or Closing."""
        item = self._next_item(w)
        fn = self.f

        def send() -> str:
            if how == "nowait":
                fn.call_nowait(item)
            elif how == "timeout0":
                fn.call(item, timeout=0)
            else:  # a short wait that nothing can end early: the loop is parked
                fn.call(item, timeout=0.005)
            return "ok"

        self._accepted(item, self.workers[w].outcome(send))

    @precondition(_accepting)
    @rule(w=st.integers(0, WORKERS - 1))
    def submit_without_waiting(self, w: int) -> None:
        item = self._next_item(w)
        fn = self.f
        outcome = self.workers[w].outcome(lambda: fn.submit(item, block=False))
        if isinstance(outcome, concurrent.futures.Future):
            self.futures[item] = outcome
            outcome = "ok"
        self._accepted(item, outcome)

    @precondition(_accepting)
    @rule(w=st.integers(0, WORKERS - 1), submit=st.booleans())
    def call_blocking(self, w: int, submit: bool) -> None:
        """A blocking call: if the queue is full it waits until the loop drains."""
        item = self._next_item(w)
        fn = self.f
        worker = self.workers[w]

        def send() -> str:
            if submit:
                self.futures[item] = fn.submit(item)
            else:
                fn.call(item)
            return "ok"

        expected = self.model.expect_call(block=True)
        worker.start(send)
        if self.model.full and expected is None:
            # It waits for room: let the loop make some. Its item goes out in this
            # drain or the next one; both have run before the invariants look.
            self._drain()
            assert worker.result() == "ok"
            self.model.queued.append(item)
            self._drain()
            return
        try:
            outcome: object = worker.result()
        except Exception as exc:
            outcome = type(exc)
        assert outcome is (expected or "ok"), f"{item}: expected {expected}, got {outcome}"
        if expected is None:
            self.model.queued.append(item)

    def _close_while_a_caller_waits(self, waiter: int, closer: int, close: str) -> None:
        # The waiter may or may not be parked yet when the closer acts: Closing
        # either way, since the parked loop frees no room.
        item = self._next_item(waiter)
        fn = self.f
        self.workers[waiter].start(lambda: fn.call(item))
        self.workers[closer].do(getattr(fn, close))
        try:
            self.workers[waiter].result()
            outcome: object = "ok"
        except Exception as exc:
            outcome = type(exc)
        assert outcome is tsfn.Closing

    @precondition(lambda self: self.model.full and not self.model.closing)
    @rule(waiter=st.integers(0, WORKERS - 1), other=st.integers(1, WORKERS - 1))
    def abort_while_a_caller_waits(self, waiter: int, other: int) -> None:
        """A caller blocked on the full queue wakes with Closing when another thread aborts."""
        self._close_while_a_caller_waits(waiter, (waiter + other) % WORKERS, "abort")
        self.model.closing = self.model.aborted = True

    @precondition(
        lambda self: self.model.full and not self.model.closing and self.model.threads == 1
    )
    @rule(waiter=st.integers(0, WORKERS - 1), other=st.integers(1, WORKERS - 1))
    def release_while_a_caller_waits(self, waiter: int, other: int) -> None:
        """...and when another thread releases the last producer."""
        self._close_while_a_caller_waits(waiter, (waiter + other) % WORKERS, "release")
        self.model.closing = True
        self.model.threads = 0

    @precondition(_accepting)
    @rule(w=st.integers(0, WORKERS - 1))
    def acquire(self, w: int) -> None:
        fn = self.f

        def acquire() -> str:
            fn.acquire()
            return "ok"

        outcome = self.workers[w].outcome(acquire)
        if self.model.closing:
            assert outcome is tsfn.Closing
        else:
            assert outcome == "ok"
            self.model.threads += 1

    @precondition(lambda self: self.model.closing and not self.model.finalized)
    @rule(
        w=st.integers(0, WORKERS - 1),
        how=st.sampled_from(["call", "call_nowait", "timed", "submit", "acquire", "loop"]),
    )
    def call_while_closing(self, w: int, how: str) -> None:
        """Closing (released to zero, or aborted) but not drained yet: every call and
        acquire raises Closing, blocking or not, from any thread."""
        item = self._next_item(w)
        fn = self.f
        attempts: dict[str, Callable[[], object]] = {
            "call": lambda: fn.call(item),
            "call_nowait": lambda: fn.call_nowait(item),
            "timed": lambda: fn.call(item, timeout=5),
            "submit": lambda: fn.submit(item),
            "acquire": fn.acquire,
        }
        if how == "loop":
            outcome = self.loop.outcome(lambda: fn.call(item))
        else:
            outcome = self.workers[w].outcome(attempts[how])
        assert outcome is tsfn.Closing

    @precondition(_open)
    @rule(w=st.integers(0, WORKERS - 1))
    def release(self, w: int) -> None:
        outcome = self.workers[w].outcome(_ok(self.f.release))
        if self.model.threads == 0:
            assert outcome is tsfn.Closing  # released more than acquired
            return
        assert outcome == "ok"
        self.model.threads -= 1
        if self.model.threads == 0:
            self.model.closing = True

    @precondition(_open)
    @rule(w=st.integers(0, WORKERS - 1))
    def abort(self, w: int) -> None:
        assert self.workers[w].outcome(_ok(self.f.abort)) == "ok"
        self.model.closing = self.model.aborted = True

    # -- rules: the loop thread ----------------------------------------------------------

    @precondition(_open)
    @rule()
    def drain(self) -> None:
        self._drain()

    @precondition(_accepting)
    @rule(block=st.booleans())
    def call_on_the_loop_thread(self, block: bool) -> None:
        """On the loop thread a call that would wait raises WouldDeadlock instead."""
        item = self._next_item(WORKERS)
        fn = self.f
        outcome = self.loop.outcome(_ok(lambda: fn.call(item, block=block)))
        expected = self.model.expect_call(block=False)
        if expected is tsfn.QueueFull and block:
            expected = tsfn.WouldDeadlock
        assert outcome is (expected or "ok"), f"{item}: expected {expected}, got {outcome}"
        if expected is None:
            self.model.queued.append(item)

    @precondition(_open)
    @rule(referenced=st.booleans())
    def ref_or_unref(self, referenced: bool) -> None:
        fn = self.f
        self.loop.do(fn.ref if referenced else fn.unref)
        self.model.referenced = referenced

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def state_matches_the_model(self) -> None:
        if self.fn is None:
            return
        model = self.model
        assert self.fn.qsize() == len(model.queued)
        assert self.fn.thread_count == model.threads
        assert self.fn.closing == model.closing
        assert self.fn.closed == model.finalized
        # Exactly what the model says, in its order: nothing twice, nothing lost,
        # each thread's order kept, the finalizer once and last.
        assert self.log == model.log

    @invariant()
    def futures_match_the_log(self) -> None:
        delivered = {item for kind, item in self.log if kind == "delivered"}
        queued = set(self.model.queued)
        for item, future in self.futures.items():
            if item in queued:
                assert not future.done()
            elif item in delivered:
                assert future.result(timeout=0) == ("result", item)
            else:
                assert future.cancelled()  # discarded by abort

    def teardown(self) -> None:
        try:
            if self.fn is not None and not self.model.finalized:
                self._close_through_tsfn_run()
        finally:
            for worker in self.workers:
                worker.stop()
            self.loop.end_main()
            self.loop.thread.join(WAIT)
            if self.loop.thread.is_alive() and self.fn is not None:
                self.fn.abort()  # a failure above: do not leave the loop thread behind
                self.loop.thread.join(WAIT)
        assert not self.loop.thread.is_alive(), "tsfn.run never returned"
        self.state_matches_the_model()

    def _close_through_tsfn_run(self) -> None:
        """End `main`: tsfn.run then waits for a referenced function, not for another."""
        model = self.model
        self.loop.end_main()
        if model.referenced and not model.closing:
            # Still open and referenced: tsfn.run must keep the loop running (the
            # loop is free now, so what is queued is delivered meanwhile)...
            self.loop.thread.join(0.05)
            assert self.loop.thread.is_alive(), "tsfn.run ended with a referenced function open"
            # ...until the last producer releases.
            for _ in range(model.threads):
                self.workers[0].do(self.f.release)
            model.threads = 0
            model.closing = True
        elif not model.referenced:
            # Unreferenced: tsfn.run aborts it at once, without draining first.
            model.closing = model.aborted = True
        self.loop.thread.join(WAIT)
        model.drained()


def test_function_matches_its_model(anyio_backend: Backend) -> None:
    class OnThisLoop(FunctionMachine):
        backend = anyio_backend

    # Typed in the hypothesis releases for 3.11+, not in the last one for 3.10.
    run_state_machine_as_test(  # type: ignore[no-untyped-call,unused-ignore]
        OnThisLoop,
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
