"""Node's own test suites for threadsafe functions, ported case by case.

Case ids follow ../shared/research/node-api-spec.md: T0-T24 are Node's
test/node-api/test_threadsafe_function{,_abort,_shutdown}; N, C, E, X, S and U are
node-addon-api's test/threadsafe_function. Each test names its case and keeps its
meaning; where Python differs from C, the test says how.

The harness mirrors binding.c:

- `Binding` is the native side: `start()` is StartThread* (a function with
  initial_thread_count=2, the main thread's and the producer's, and a producer
  thread running `data_source_thread`), `stop_thread()` is StopThread (release or
  abort the main thread's count), the finalizer is `join_the_threads`.
- `with_js_marshaller()` is common-threadsafe.js's testWithJSMarshaller: the
  "JS callback" collects values and stops the thread after `quit_after` of them.

Two of Node's timing tricks become events here, so the outcome never depends on
timing:

- For a non-blocking producer Node busy-waits 200 ms on the main thread so the
  queue fills up. Here the loop thread waits for the producer to report QueueFull.
- With an unbounded queue Node's producer busy-spins 200 ms every 1,000 items "to
  give the main thread a chance to abort". Here it waits at those points until the
  loop has delivered that item and taken one more turn (or the function is
  aborted): by then the main thread has had its chance.

Scale: Node uses 10,000 values. The unbounded-queue cases and T10 keep 10,000 (they
cost milliseconds). With MAX_QUEUE_SIZE = 2 every second item is a thread hand-off
(about 50 us each under the GIL), so those cases use 2,000 values: the same
behaviour, one fifth of the time. T1 alone keeps the full 10,000 as the reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _helpers import WAIT, Worker, asyncio_loop, loop_errors, start
from _loops import LoopFactory

import tsfn
from tsfn._loop import Port
from tsfn._running import running_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

# The `run_on_new_loop` fixture: run main() on a new loop of each kind, to its end.
RunOnNewLoop = Callable[[Callable[[], Awaitable[None]]], None]


ARRAY_LENGTH = 10_000  # binding.c
BOUNDED_LENGTH = 2_000  # binding.c's 10,000, scaled for the queue of 2 (see above)
MAX_QUEUE_SIZE = 2  # binding.c
ADDON_LENGTH = 10  # node-addon-api's threadsafe_function.cc


def expected(length: int) -> list[int]:
    """common-threadsafe.js's expectedArray: the producer counts down."""
    return list(range(length - 1, -1, -1))


@dataclasses.dataclass(frozen=True)
class Starter:
    """One of binding.c's StartThread* entry points (or node-addon-api's)."""

    name: str
    block: bool
    # "native": call_js(loop, callback, ...) calls callback(value);
    # "default": no call_js, tsfn calls callback(data) itself;
    # "alt_ref": no callback, call_js finds the JS function elsewhere (NoJsFunc);
    # "per_call": each item is its own little function, run by call_js (addon-api).
    marshal: str
    # What each call carries: the value, nothing (BlockingCall()), or a closure.
    data: str = "int"


# binding.c
START_THREAD = Starter("StartThread", block=True, marshal="native")
START_THREAD_NONBLOCKING = Starter("StartThreadNonblocking", block=False, marshal="native")
START_THREAD_NO_NATIVE = Starter("StartThreadNoNative", block=True, marshal="default")
START_THREAD_NO_JS_FUNC = Starter("StartThreadNoJsFunc", block=True, marshal="alt_ref")
# node-addon-api's threadsafe_function.cc
ADDON_NO_NATIVE = Starter("startThreadNoNative", block=True, marshal="default", data="none")
ADDON_NONBLOCKING_NO_NATIVE = Starter(
    "startThreadNonblockingNoNative", block=False, marshal="default", data="none"
)
ADDON_SINGLE_ARG = Starter(
    "startThreadNonblockSingleArg", block=False, marshal="per_call", data="closure"
)


class PerCall:
    """node-addon-api's NonBlockingCall(callback): the item is a function sending 42."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.runs = 0

    def __call__(self) -> int:
        self.runs += 1
        return 42


class Binding:
    """binding.c: a producer thread (and maybe a secondary) feeding one function."""

    def __init__(
        self,
        starter: Starter,
        *,
        abort: bool,
        launch_secondary: bool,
        max_queue_size: int,
        length: int,
        pause_every: int,
    ) -> None:
        if max_queue_size == 0:
            # The "chance to abort" pause is signalled from call_js.
            assert starter.marshal != "default"
        self.starter = starter
        self.abort = abort
        self.launch_secondary = launch_secondary
        self.max_queue_size = max_queue_size
        self.length = length
        self.pause_every = pause_every
        self.fatal_errors: list[str] = []  # binding.c's napi_fatal_error
        self.accepted: list[object] = []  # data of every call that did not raise
        self.delivered: list[object] = []  # data handed to call_js with a live loop
        self.discarded: list[object] = []  # data handed to call_js(None, None, ...)
        self.finalizer_calls = 0
        self.queue_was_full = threading.Event()
        self.queue_was_closing = False
        # One event per pause point: the main thread has had its chance.
        self.chances = {i: threading.Event() for i in range(0, length, pause_every)}
        self.threads: list[Worker] = []
        self.finalize_js: Callable[[], None] | None = None
        self.alt_ref: Callable[[object], None] | None = None
        self.fn: tsfn.ThreadsafeFunction[Any] | None = None
        self.port: Port | None = None  # the running loop's, for setImmediate

    def fatal(self, message: str) -> None:
        self.fatal_errors.append(message)

    # -- StartThread* / StopThread ---------------------------------------------------------

    def start(self, js_callback: Callable[[object], None]) -> None:
        self.port = running_port("Binding.start")
        marshal = self.starter.marshal
        if marshal == "alt_ref":
            self.alt_ref = js_callback  # the JS function, kept apart from the function
        self.fn = tsfn.ThreadsafeFunction(
            None if marshal == "alt_ref" else js_callback,
            call_js=None if marshal == "default" else self.call_js,
            context=self,
            max_queue_size=self.max_queue_size,
            initial_thread_count=2,
            finalizer=self.join_the_threads,
            name="Node-API Thread-safe Function Test",
        )
        producer = Worker(self.data_source_thread, "data_source_thread")
        self.threads.append(producer)  # before it starts: it appends the secondary
        producer.start()

    def stop_thread(self, finalize_js: Callable[[], None], abort: bool) -> None:
        assert self.fn is not None
        self.finalize_js = finalize_js
        if abort:
            self.fn.abort()
            self.give_every_chance()  # an aborted function needs no more pauses
        else:
            self.fn.release()

    # -- on the loop thread ----------------------------------------------------------------

    def call_js(self, loop: object, callback: Any, context: object, data: Any) -> None:
        if context is not self:
            self.fatal("call_js got the wrong context")
        if loop is None:
            if callback is not None:
                self.fatal("a discarded item came with a callback")
            self.discarded.append(data)
            return
        self.delivered.append(data)
        if self.starter.marshal == "alt_ref":
            if callback is not None:
                self.fatal("NoJsFunc: call_js got a callback")
            assert self.alt_ref is not None
            self.alt_ref(data)
        elif self.starter.marshal == "per_call":
            callback(data())
        else:
            callback(data)
        if isinstance(data, int) and data in self.chances:
            assert self.port is not None
            # After this item, and after whatever this turn scheduled (setImmediate).
            self.port.call_soon(self.chances[data].set)

    def join_the_threads(self, context: object) -> None:
        self.finalizer_calls += 1
        if context is not self:
            self.fatal("the finalizer got the wrong context")
        self.give_every_chance()
        for thread in list(self.threads):
            thread.join(WAIT)
            if thread.is_alive():
                self.fatal(f"{thread.name} still runs when the finalizer joins it")
        if self.finalize_js is not None:
            self.finalize_js()

    def give_every_chance(self) -> None:
        for chance in self.chances.values():
            chance.set()

    # -- the producer ------------------------------------------------------------------------

    def item(self, index: int) -> object:
        return {"int": index, "none": None, "closure": PerCall(index)}[self.starter.data]

    def data_source_thread(self) -> None:
        fn = self.fn
        assert fn is not None
        if fn.context is not self:  # napi_get_threadsafe_function_context
            self.fatal("the producer got the wrong context")
        if self.launch_secondary:
            fn.acquire()
            secondary = Worker(fn.release, "secondary_thread")
            self.threads.append(secondary)
            secondary.start()

        queue_was_full = False
        index = self.length - 1
        while index > -1:
            data = self.item(index)
            try:
                fn.call(data, block=self.starter.block)
            except tsfn.QueueFull:
                queue_was_full = True
                self.queue_was_full.set()
                time.sleep(0)  # let the loop thread have the GIL, then retry this index
                continue
            except tsfn.Closing:
                self.queue_was_closing = True
                break
            self.accepted.append(data)
            paused = self.max_queue_size == 0 and index in self.chances
            if paused and not self.chances[index].wait(WAIT):
                self.fatal(f"the main thread never took its chance after {index}")
            index -= 1

        if not self.starter.block and not queue_was_full:
            self.fatal("queue was never full")
        if self.abort and not self.queue_was_closing:
            self.fatal("queue was never closing")
        if not self.queue_was_closing:
            fn.release()  # Node's producer does not release after napi_closing

    # -- after the finalizer ---------------------------------------------------------------

    def check(self) -> None:
        """What binding.c would have aborted the process for, and Node's mustCall."""
        assert self.fatal_errors == []
        for thread in self.threads:
            assert not thread.is_alive()
            assert thread.error is None, f"{thread.name} raised {thread.error!r}"
        assert self.finalizer_calls == 1
        assert self.fn is not None
        assert self.fn.closed
        if self.starter.marshal != "default":
            # Every accepted call went to call_js exactly once: delivered, then discarded.
            assert self.delivered + self.discarded == self.accepted
        if self.starter.data == "closure":
            assert all(item.runs == 0 for item in self.discarded if isinstance(item, PerCall))


async def with_js_marshaller(
    starter: Starter,
    *,
    quit_after: int,
    max_queue_size: int,
    abort: bool = False,
    launch_secondary: bool = False,
    length: int = ARRAY_LENGTH,
    stop_in_callback: bool = False,
    pause_every: int = 1000,
) -> tuple[list[object], Binding]:
    """common-threadsafe.js's testWithJSMarshaller; returns the values and the binding.

    Node stops the thread from `setImmediate` (the next loop turn); node-addon-api's
    port calls stopThread inside the callback itself (`stop_in_callback`).
    """
    port = running_port("with_js_marshaller")
    done = anyio.Event()
    array: list[object] = []
    binding = Binding(
        starter,
        abort=abort,
        launch_secondary=launch_secondary,
        max_queue_size=max_queue_size,
        length=length,
        pause_every=pause_every,
    )

    def test_callback(value: object) -> None:
        array.append(value)
        if len(array) == quit_after:

            def stop() -> None:
                binding.stop_thread(done.set, abort)

            if stop_in_callback:
                stop()
            else:
                port.call_soon(stop)  # setImmediate

    binding.start(test_callback)
    # Node busy-waits 200 ms here so the queue fills; we wait until it has.
    # Blocking the loop thread is the point: nothing drains meanwhile.
    if not starter.block and not binding.queue_was_full.wait(WAIT):
        binding.fatal("the non-blocking producer never found the queue full")
    await done.wait()
    for _ in range(3):  # a second finalizer call would come on a later turn
        await anyio.lowlevel.checkpoint()
    binding.check()
    return array, binding


def assert_could_not_finish(result: list[object], binding: Binding, length: int) -> None:
    """Node's `indexOf(0) === -1` after an abort, and the closing the producer saw."""
    assert 0 not in result
    assert len(result) < length
    assert binding.queue_was_closing
    assert binding.fn is not None
    assert binding.fn.closing


# -- T0-T10, T12-T14: test-threadsafe.js and test-threadsafe-infinite-queue.js -----------


async def test_T0_without_call_js_the_callback_gets_every_item() -> None:
    """testWithoutJSMarshaller. Node's default marshaller calls the JS function with no
    arguments; tsfn's (no call_js) calls callback(data): every item, exactly once."""
    result, _ = await with_js_marshaller(
        START_THREAD_NO_NATIVE,
        quit_after=BOUNDED_LENGTH,
        max_queue_size=MAX_QUEUE_SIZE,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)


async def test_T1_blocking_calls_on_a_bounded_queue_deliver_every_value_in_order() -> None:
    """The one bounded case at Node's full length, as the faithful reference."""
    result, _ = await with_js_marshaller(
        START_THREAD, quit_after=ARRAY_LENGTH, max_queue_size=MAX_QUEUE_SIZE
    )
    assert result == expected(ARRAY_LENGTH)


async def test_T2_call_js_without_a_callback_delivers_every_value() -> None:
    """StartThreadNoJsFunc: callback=None, call_js gets callback=None and finds the
    JS function elsewhere."""
    result, _ = await with_js_marshaller(
        START_THREAD_NO_JS_FUNC,
        quit_after=BOUNDED_LENGTH,
        max_queue_size=MAX_QUEUE_SIZE,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)


async def test_T3_non_blocking_calls_retry_on_queue_full_and_deliver_every_value() -> None:
    result, binding = await with_js_marshaller(
        START_THREAD_NONBLOCKING,
        quit_after=BOUNDED_LENGTH,
        max_queue_size=MAX_QUEUE_SIZE,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)
    assert binding.queue_was_full.is_set()


async def test_T4_release_after_the_first_value_drops_nothing() -> None:
    result, _ = await with_js_marshaller(
        START_THREAD, quit_after=1, max_queue_size=MAX_QUEUE_SIZE, length=BOUNDED_LENGTH
    )
    assert result == expected(BOUNDED_LENGTH)


async def test_T5_non_blocking_release_after_the_first_value_drops_nothing() -> None:
    result, _ = await with_js_marshaller(
        START_THREAD_NONBLOCKING,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)


async def test_T6_acquire_and_release_on_a_secondary_thread_drop_nothing() -> None:
    result, binding = await with_js_marshaller(
        START_THREAD,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        launch_secondary=True,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)
    assert [thread.name for thread in binding.threads] == [
        "data_source_thread",
        "secondary_thread",
    ]


async def test_T7_non_blocking_with_a_secondary_thread_drops_nothing() -> None:
    result, _ = await with_js_marshaller(
        START_THREAD_NONBLOCKING,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        launch_secondary=True,
        length=BOUNDED_LENGTH,
    )
    assert result == expected(BOUNDED_LENGTH)


async def test_T8_abort_after_the_first_value_wakes_the_blocked_producer() -> None:
    result, binding = await with_js_marshaller(
        START_THREAD,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        abort=True,
        length=BOUNDED_LENGTH,
    )
    assert_could_not_finish(result, binding, BOUNDED_LENGTH)


async def test_T9_abort_stops_a_non_blocking_producer() -> None:
    result, binding = await with_js_marshaller(
        START_THREAD_NONBLOCKING,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        abort=True,
        length=BOUNDED_LENGTH,
    )
    assert_could_not_finish(result, binding, BOUNDED_LENGTH)


async def test_T10_more_than_a_drain_batch_queued_per_wake_up_never_stalls() -> None:
    """kMaxIterationCount: a queue of 5,000 is full before the loop drains at all, so
    each wake-up finds far more items than one batch delivers."""
    result, binding = await with_js_marshaller(
        START_THREAD_NONBLOCKING,
        quit_after=ARRAY_LENGTH,
        max_queue_size=ARRAY_LENGTH // 2,
    )
    assert result == expected(ARRAY_LENGTH)
    assert binding.queue_was_full.is_set()


async def test_T12_blocking_calls_on_an_unbounded_queue_deliver_every_value() -> None:
    result, _ = await with_js_marshaller(START_THREAD, quit_after=ARRAY_LENGTH, max_queue_size=0)
    assert result == expected(ARRAY_LENGTH)


async def test_T13_unbounded_release_after_the_first_value_drops_nothing() -> None:
    result, _ = await with_js_marshaller(START_THREAD, quit_after=1, max_queue_size=0)
    assert result == expected(ARRAY_LENGTH)


async def test_T14_unbounded_abort_after_the_first_value_discards_the_rest() -> None:
    result, binding = await with_js_marshaller(
        START_THREAD, quit_after=1, max_queue_size=0, abort=True
    )
    assert_could_not_finish(result, binding, ARRAY_LENGTH)
    assert binding.discarded == binding.accepted[len(binding.delivered) :]


# -- T11, T15: testUnref, and node-addon-api's U1, U2 (child processes) -----------------

CHILD = r"""
import sys
import threading

import tsfn
from tsfn._running import running_port


def say(*words):
    print(*words, flush=True)


async def teardown_after_unref(max_queue_size):
    # common-threadsafe.js's child: StartThread(abort=false, secondary=true),
    # Release() at once, Unref() after the second value; never released otherwise.
    port = running_port("the child")
    chances = {i: threading.Event() for i in range(0, 10000, 1000)}
    threads = []
    values = 0

    def callback(value):
        nonlocal values
        values += 1
        say(value)
        if values == 2:
            fn.unref()
        if value in chances:
            port.call_soon(chances[value].set)

    def join_the_threads(context):
        for chance in chances.values():
            chance.set()
        for thread in threads:
            thread.join()
        say("finalized")

    fn = tsfn.ThreadsafeFunction(
        callback,
        max_queue_size=max_queue_size,
        initial_thread_count=2,
        finalizer=join_the_threads,
    )

    def data_source_thread():
        fn.acquire()
        secondary = threading.Thread(target=fn.release)
        threads.append(secondary)
        secondary.start()
        for index in range(9999, -1, -1):
            try:
                fn.call(index)
            except tsfn.Closing:
                return
            if max_queue_size == 0 and index in chances:
                chances[index].wait()
        fn.release()

    producer = threading.Thread(target=data_source_thread)
    threads.append(producer)
    producer.start()
    fn.release()


async def unref_without_release():
    # U1: BlockingCall(), Unref() later, never Release().
    def callback(data):
        say("called")
        fn.unref()

    fn = tsfn.ThreadsafeFunction(
        callback, max_queue_size=1, finalizer=lambda context: say("finalized")
    )
    fn.call()


async def ref_keeps_running():
    # U2: BlockingCall(), Unref(), Ref(), never Release().
    fn = tsfn.ThreadsafeFunction(lambda data: say("called"), max_queue_size=1)
    fn.call()
    fn.unref()
    fn.ref()
    # A timer thread, not one of the loop's: any loop kind runs what it schedules.
    later = threading.Timer(0.2, running_port("the child").call_soon_threadsafe, [still])
    later.daemon = True
    later.start()
    say("main returned")


def still():
    say("still running")


scenario, loop = sys.argv[1], sys.argv[2]
if scenario == "unref":
    main, args = teardown_after_unref, [int(sys.argv[3])]
elif scenario == "unref-without-release":
    main, args = unref_without_release, []
else:
    main, args = ref_keeps_running, []
if loop == "trio":
    tsfn.run(main, *args, backend="trio")
else:
    tsfn.run(main, *args, backend_options={"use_uvloop": loop == "uvloop"})
say("exit")
"""


@pytest.fixture(params=["asyncio", "uvloop", "trio"])
def child_loop(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    return str(request.param)


def child(*args: str) -> subprocess.Popen[str]:
    """Run CHILD with this interpreter and its flags, tsfn importable from this tree."""
    root = str(Path(tsfn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    flags = ["-X", "dev"] if sys.flags.dev_mode else []
    return subprocess.Popen(
        [sys.executable, *flags, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, list[str], str]:
    try:
        out, err = process.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError("the child process did not exit") from None
    return process.returncode, out.split(), err


@pytest.mark.parametrize(
    "max_queue_size", [MAX_QUEUE_SIZE, 0], ids=["T11-queue-of-2", "T15-unbounded"]
)
def test_T11_T15_unref_lets_the_process_exit_and_tears_the_function_down(
    child_loop: str, max_queue_size: int
) -> None:
    """testUnref: the main thread released, a producer still holds the function; after
    unref the loop may end, which aborts it: the producer stops, 0 never arrives."""
    code, out, err = finish(child("unref", child_loop, str(max_queue_size)))
    assert code == 0, err
    assert "Traceback" not in err
    assert out[-2:] == ["finalized", "exit"]
    values = [int(word) for word in out[:-2]]
    assert len(values) >= 2  # unref came after the second value
    assert values == expected(ARRAY_LENGTH)[: len(values)]
    assert 0 not in values  # what Node's indexOf(0) check means to say


def test_U1_unref_without_release_lets_the_process_exit(child_loop: str) -> None:
    code, out, err = finish(child("unref-without-release", child_loop))
    assert code == 0, err
    assert "Traceback" not in err
    assert out == ["called", "finalized", "exit"]


def test_U2_ref_after_unref_keeps_the_process_running(child_loop: str) -> None:
    """testRef: never released and referenced again, the function keeps tsfn.run alive
    after main returned; a timer firing later proves the loop still turns."""
    process = child("ref", child_loop)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(3)]
        assert sorted(lines) == ["called", "main returned", "still running"]
        assert process.poll() is None, "the process exited while referenced"
    finally:
        process.kill()
        process.communicate()


# -- T16-T19: uncaught exceptions ----------------------------------------------------------


async def test_T16_T17_callback_then_finalizer_exceptions_reach_the_handler_in_order() -> None:
    """CallIntoModule: one call, one release. The callback's exception reaches the loop's
    handler first, the finalizer's second (Node: 'uncaughtException', twice). On trio,
    which has no such handler, "the handler" is the `tsfn` logger (docs/trio.md).

    T18/T19 are Node's legacy policy that swallows both; tsfn has no such mode, so
    they have no port: exceptions always reach the handler.
    """
    calls: list[str] = []
    callback_error, finalizer_error = (
        RuntimeError("callback error"),
        RuntimeError("finalizer error"),
    )

    def callback(data: object) -> None:
        calls.append("callback")
        raise callback_error

    def finalizer(context: object) -> None:
        calls.append("finalizer")
        raise finalizer_error

    with loop_errors() as reported:
        fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
            callback, finalizer=finalizer, name="resource_name"
        )
        fn.call(None)
        fn.release()
        await fn.wait_closed()
    assert calls == ["callback", "finalizer"]
    assert [context["exception"] for context in reported] == [callback_error, finalizer_error]


# -- T20: test_threadsafe_function_abort ---------------------------------------------------


def test_T20_abort_hands_the_queued_item_to_call_js_once_before_the_finalizer(
    run_on_new_loop: RunOnNewLoop,
) -> None:
    """call(), unref(), abort() in one turn: call_js gets the item once, as a discard
    (loop and callback None), and only then does the finalizer run; the run ends."""
    context = object()
    events: list[tuple[object, ...]] = []

    def call_js(loop: object, callback: object, ctx: object, data: object) -> None:
        events.append(("call_js", loop, callback, ctx, data))

    def finalizer(ctx: object) -> None:
        events.append(("finalizer", ctx))

    async def main() -> None:
        fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
            call_js=call_js, context=context, finalizer=finalizer
        )
        fn.call("item")
        fn.unref()
        fn.abort()

    run_on_new_loop(main)
    assert events == [("call_js", None, None, context, "item"), ("finalizer", context)]


# -- T21, T22: test_threadsafe_function_shutdown -------------------------------------------

SHUTDOWN_THREADS = 32


@dataclasses.dataclass
class Shutdown:
    """T21/T22's child: 32 threads call an unreferenced function until a call fails."""

    pace: float  # Node calls every 1 ms in T21; the pace is not what is tested
    max_queue_size: int
    finalized: int = 0
    workers: list[Worker] = dataclasses.field(default_factory=list)
    fn: tsfn.ThreadsafeFunction[int] | None = None

    async def main(self) -> None:
        delivered = 0
        enough = anyio.Event()

        def call_js(loop: object, callback: object, context: object, data: int) -> None:
            nonlocal delivered
            if loop is not None:
                delivered += 1
                if delivered == 10 * SHUTDOWN_THREADS:
                    enough.set()

        def finalizer(context: object) -> None:
            self.finalized += 1

        self.fn = tsfn.ThreadsafeFunction(
            call_js=call_js,
            max_queue_size=self.max_queue_size,
            initial_thread_count=SHUTDOWN_THREADS,
            finalizer=finalizer,
        )
        all_started = threading.Barrier(SHUTDOWN_THREADS + 1)
        self.workers = [
            start(functools.partial(self.call_until_not_ok, all_started, me), f"caller-{me}")
            for me in range(SHUTDOWN_THREADS)
        ]
        self.fn.unref()
        all_started.wait(WAIT)  # every thread is calling (the loop thread waits here)
        await enough.wait()  # Node: setTimeout(() => {}, 100); then the loop ends

    def call_until_not_ok(self, all_started: threading.Barrier, me: int) -> None:
        assert self.fn is not None
        all_started.wait(WAIT)
        while True:
            self.fn.call(me)  # only Closing may end this
            if self.pace:
                time.sleep(self.pace)

    def check(self) -> None:
        for worker in self.workers:
            worker.join(WAIT)
            assert not worker.is_alive()
            assert isinstance(worker.error, tsfn.Closing), repr(worker.error)
        assert self.finalized == 1
        assert self.fn is not None
        assert self.fn.closed


def test_T21_32_threads_calling_at_loop_shutdown_all_see_closing(
    run_on_new_loop: RunOnNewLoop,
) -> None:
    scenario = Shutdown(pace=0.001, max_queue_size=0)
    run_on_new_loop(scenario.main)
    scenario.check()


def test_T22_32_threads_blocked_on_a_full_queue_at_asyncio_runner_shutdown_all_see_closing(
    loop_factory: LoopFactory, tiny_switch_interval: None
) -> None:
    """concurrent_calls: the same without pacing, through asyncio's own shutdown. The
    queue is bounded, so most callers wait for room when the loop ends (and an
    unbounded queue would only grow while 32 threads outrun one loop)."""
    if sys.version_info < (3, 11):
        pytest.skip("asyncio.Runner is new in 3.11")
    scenario = Shutdown(pace=0, max_queue_size=SHUTDOWN_THREADS)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario.main())
    scenario.check()


# -- T23, T24: multi-thread-count release, re-entrant release -----------------------------


@pytest.mark.parametrize("where", ["loop-thread", "three-threads"])
async def test_T23a_releasing_every_count_finalizes_exactly_once(
    where: str, tiny_switch_interval: None
) -> None:
    finalized: list[object] = []
    never_called: list[object] = []
    fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
        call_js=lambda *args: never_called.append(args),
        initial_thread_count=3,
        finalizer=finalized.append,
        context="ctx",
    )
    if where == "loop-thread":
        for _ in range(3):
            fn.release()
    else:
        together = threading.Barrier(3)

        def release_together() -> None:
            together.wait(WAIT)
            fn.release()

        workers = [start(release_together) for _ in range(3)]
        for worker in workers:
            worker.join(WAIT)
            assert worker.error is None
    await fn.wait_closed()
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    assert finalized == ["ctx"]
    assert never_called == []


async def test_T23b_calls_after_abort_raise_closing_and_finalize_exactly_once() -> None:
    finalized: list[object] = []
    never_called: list[object] = []
    fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
        call_js=lambda *args: never_called.append(args),
        initial_thread_count=3,
        finalizer=finalized.append,
    )
    fn.abort()
    for _ in range(2):
        with pytest.raises(tsfn.Closing):
            fn.call_nowait(None)
    await fn.wait_closed()
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    assert finalized == [None]
    assert never_called == []


@pytest.mark.parametrize("whose_finalizer", ["another-functions", "its-own"])
def test_T24_abort_and_release_from_a_finalizer_at_teardown_do_not_reenter(
    run_on_new_loop: RunOnNewLoop, whose_finalizer: str
) -> None:
    """reentrant_release: an unreferenced function, never released, is aborted and
    released from a finalizer that runs while the loop tears down."""
    finalized: list[str] = []
    raised: list[BaseException] = []
    reported: list[dict[str, Any]] = []

    def abort_and_release(fn: tsfn.ThreadsafeFunction[None]) -> None:
        try:
            fn.abort()
            fn.release()  # the initial count is still there: allowed
        except BaseException as exc:
            raised.append(exc)

    async def main() -> None:
        # The loop's handler, set for the whole run: teardown comes after main returns.
        if (loop := asyncio_loop()) is not None:
            loop.set_exception_handler(lambda _loop, context: reported.append(context))

        def fn_finalizer(context: object) -> None:
            finalized.append("fn")
            if whose_finalizer == "its-own":
                abort_and_release(fn)

        def holder_finalizer(context: object) -> None:
            finalized.append("holder")
            abort_and_release(fn)

        fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
            call_js=lambda *args: None, finalizer=fn_finalizer
        )
        fn.unref()
        if whose_finalizer == "another-functions":
            holder: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
                call_js=lambda *args: None, finalizer=holder_finalizer
            )
            holder.unref()

    with loop_errors() as logged:  # no loop yet: what tsfn logs, as it does on trio
        run_on_new_loop(main)
    assert raised == []
    assert reported == []
    assert logged == []
    assert finalized.count("fn") == 1


# -- node-addon-api: threadsafe_function.js (N1-N16) ----------------------------------------


@pytest.mark.parametrize(
    "starter", [ADDON_NO_NATIVE, ADDON_NONBLOCKING_NO_NATIVE], ids=["N1", "N2"]
)
async def test_N1_N2_calls_without_data_reach_the_callback_as_none(starter: Starter) -> None:
    """BlockingCall() / NonBlockingCall(): no data; the callback gets None, ten times."""
    result, _ = await with_js_marshaller(
        starter,
        quit_after=ADDON_LENGTH,
        max_queue_size=MAX_QUEUE_SIZE,
        length=ADDON_LENGTH,
        stop_in_callback=False,  # N1/N2 stop from setImmediate too
    )
    assert result == [None] * ADDON_LENGTH


ADDON_CASES = [
    # id, starter, max_queue_size, quit_after, secondary, abort
    ("N3", START_THREAD, MAX_QUEUE_SIZE, ADDON_LENGTH, False, False),
    ("N4", START_THREAD, 0, ADDON_LENGTH, False, False),
    ("N5", START_THREAD_NONBLOCKING, MAX_QUEUE_SIZE, ADDON_LENGTH, False, False),
    ("N6", START_THREAD, MAX_QUEUE_SIZE, 1, False, False),
    ("N7", START_THREAD, 0, 1, False, False),
    ("N8", START_THREAD_NONBLOCKING, MAX_QUEUE_SIZE, 1, False, False),
    ("N10", START_THREAD, MAX_QUEUE_SIZE, 1, True, False),
    ("N11", START_THREAD_NONBLOCKING, MAX_QUEUE_SIZE, 1, True, False),
    ("N13", START_THREAD, MAX_QUEUE_SIZE, 1, False, True),
    ("N14", START_THREAD, 0, 1, False, True),
    ("N15", START_THREAD_NONBLOCKING, MAX_QUEUE_SIZE, 1, False, True),
]


@pytest.mark.parametrize(
    ("starter", "max_queue_size", "quit_after", "secondary", "abort"),
    [case[1:] for case in ADDON_CASES],
    ids=[case[0] for case in ADDON_CASES],
)
async def test_N3_to_N15_release_or_abort_from_inside_the_callback(
    starter: Starter, max_queue_size: int, quit_after: int, secondary: bool, abort: bool
) -> None:
    """node-addon-api's version of T1-T14 with ten values, and one difference that
    matters: stopThread (release or abort) runs inside the callback, in the middle of
    a drain, not on a later turn. Its producer pauses after every call when the
    queue is unbounded."""
    result, binding = await with_js_marshaller(
        starter,
        quit_after=quit_after,
        max_queue_size=max_queue_size,
        launch_secondary=secondary,
        abort=abort,
        length=ADDON_LENGTH,
        stop_in_callback=True,
        pause_every=1,
    )
    if abort:
        assert_could_not_finish(result, binding, ADDON_LENGTH)
    else:
        assert result == expected(ADDON_LENGTH)


@pytest.mark.parametrize(
    ("secondary", "abort"),
    [(False, False), (True, False), (False, True)],
    ids=["N9", "N12", "N16"],
)
async def test_N9_N12_N16_items_that_are_functions_run_on_delivery_never_on_discard(
    secondary: bool, abort: bool
) -> None:
    """NonBlockingCall(callback): each item carries its own function sending 42.
    call_js runs it on delivery; a discarded one (abort) is handed back unrun."""
    result, binding = await with_js_marshaller(
        ADDON_SINGLE_ARG,
        quit_after=1,
        max_queue_size=MAX_QUEUE_SIZE,
        launch_secondary=secondary,
        abort=abort,
        length=ADDON_LENGTH,
        stop_in_callback=True,
    )
    assert set(result) == {42}
    runs = [item.runs for item in binding.delivered if isinstance(item, PerCall)]
    assert runs == [1] * len(binding.delivered)
    if abort:
        assert len(result) < ADDON_LENGTH
        assert binding.queue_was_closing
    else:
        assert len(result) == ADDON_LENGTH


# -- C1, C2: threadsafe_function_ctx.js ----------------------------------------------------


async def test_C1_C2_context_is_returned_and_handed_to_the_finalizer() -> None:
    """getContext() returns what was passed, from any thread; release() resolves through
    the finalizer, which gets the context. Without one, the context is None."""
    context = object()
    seen: list[object] = []
    fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
        lambda _: None, context=context, max_queue_size=1, finalizer=seen.append
    )
    from_thread: list[object] = []
    start(lambda: from_thread.append(fn.context)).join(WAIT)
    assert fn.context is context
    assert from_thread == [context]
    fn.release()
    await fn.wait_closed()
    assert seen == [context]

    bare: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(
        lambda _: None, finalizer=seen.append
    )
    assert bare.context is None
    bare.release()
    await bare.wait_closed()
    assert seen == [context, None]


# -- E1, E2: threadsafe_function_exception.js ----------------------------------------------


@pytest.mark.parametrize("thrower", ["callback", "call_js"], ids=["E1", "E2"])
async def test_E1_E2_an_exception_in_the_callback_or_call_js_is_reported_once(
    thrower: str,
) -> None:
    """E1: the JS callback throws; E2: the native call_js throws. Either way exactly
    one report to the loop's handler (trio: the `tsfn` logger), with that exception,
    and one call."""
    error = ValueError(f"test-from-{thrower}")
    calls: list[object] = []

    def raising(*args: object) -> None:
        calls.append(args)
        raise error

    with loop_errors() as reported:
        if thrower == "callback":
            fn: tsfn.ThreadsafeFunction[None] = tsfn.ThreadsafeFunction(raising)
        else:
            fn = tsfn.ThreadsafeFunction(call_js=raising)  # no callback, like the typed E2
        start(lambda: fn.call(None)).join(WAIT)
        fn.release()
        await fn.wait_closed()
    assert len(calls) == 1
    assert [context["exception"] for context in reported] == [error]


# -- X1-X4: threadsafe_function_existing_tsfn.js -------------------------------------------


@pytest.mark.parametrize("block", [True, False], ids=["blocking", "non-blocking"])
@pytest.mark.parametrize("with_data", [True, False], ids=["data", "no-data"])
async def test_X1_to_X4_release_from_inside_call_js_delivers_then_finalizes(
    block: bool, with_data: bool
) -> None:
    """call_js releases the function while it is being delivered to; the finalizer
    then resolves the test with what call_js saw (a number, or None without data)."""
    resolved = anyio.Event()
    resolved_with: list[object] = []
    context: dict[str, object] = {}

    def resolve(ctx: dict[str, object]) -> None:
        resolved_with.append(ctx["data"])
        resolved.set()

    def call_js(loop: object, callback: object, ctx: dict[str, object], data: object) -> None:
        assert loop is not None
        ctx["data"] = data
        fn.release()

    fn: tsfn.ThreadsafeFunction[object] = tsfn.ThreadsafeFunction(
        call_js=call_js,
        context=context,
        finalizer=resolve,
    )

    def call() -> None:
        if with_data:
            fn.call(42, block=block)
        else:
            fn.call(block=block)

    start(call).join(WAIT)
    await resolved.wait()
    assert resolved_with == [42 if with_data else None]
    assert fn.closed
    with pytest.raises(tsfn.Closing):
        fn.call(1)


# -- S1-S3: threadsafe_function_sum.js -----------------------------------------------------

SUM_THREADS = 5  # node-addon-api's THREAD_COUNT; EXPECTED_SUM = 0 + 1 + 2 + 3 + 4 = 10


@pytest.mark.parametrize("when", ["S1-delayed", "S2-at-start", "S3-acquire"])
async def test_S1_to_S3_five_threads_sum_to_ten(when: str, tiny_switch_interval: None) -> None:
    """S1: threads exist first and get the function later; S2: they get it at start
    (initial_thread_count=5, each releases). S3: each acquires its own count, and the
    main thread releases its one after all five calls arrived."""
    calls: list[int] = []
    handed_over = threading.Event()
    holder: list[tsfn.ThreadsafeFunction[int]] = []
    all_arrived = anyio.Event()

    def callback(thread_id: int) -> None:
        calls.append(thread_id)
        if len(calls) == SUM_THREADS and when == "S3-acquire":
            all_arrived.set()

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        callback, initial_thread_count=1 if when == "S3-acquire" else SUM_THREADS
    )

    def thread(thread_id: int) -> None:
        handed_over.wait(WAIT)  # S1: the function arrives after the thread started
        [own] = holder
        if when == "S3-acquire":
            with own.acquire():
                own.call(thread_id)
        else:
            own.call(thread_id)
            own.release()

    if when != "S1-delayed":
        holder.append(fn)
        handed_over.set()
    workers = [start(functools.partial(thread, i), f"sum-{i}") for i in range(SUM_THREADS)]
    if when == "S1-delayed":
        holder.append(fn)
        handed_over.set()
    if when == "S3-acquire":
        await all_arrived.wait()
        fn.release()  # mainWantsRelease
    await fn.wait_closed()
    for worker in workers:
        worker.join(WAIT)
        assert worker.error is None
    assert sorted(calls) == list(range(SUM_THREADS))
    assert sum(calls) == 10
