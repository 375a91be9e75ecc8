"""What is particular to trio: the token, shutdown at the end of `trio.run`, errors
that trio has no handler for, trio's worker threads, and `tsfn.run`'s backend forms.

The behaviours every loop shares run on trio through the suite's `anyio_backend`
parametrisation (tests/conftest.py); these are the ones that need `trio.run` itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import trio
from _helpers import wait_until

import tsfn
from tsfn import AsyncWork, Closing, ThreadsafeFunction

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0


def test_call_js_gets_the_runs_token_and_runs_on_the_trio_thread() -> None:
    seen: list[tuple[object, bool, object]] = []

    def call_js(token: object, callback: object, context: object, data: object) -> None:
        seen.append((token, threading.current_thread() is trio_thread, data))

    async def main() -> object:
        fn: ThreadsafeFunction[int] = ThreadsafeFunction(call_js=call_js)

        def produce() -> None:
            for i in range(3):
                fn.call(i)
            fn.release()

        await trio.to_thread.run_sync(produce)
        await fn.wait_closed()
        return trio.lowlevel.current_trio_token()

    trio_thread = threading.current_thread()
    token = trio.run(main)
    assert seen == [(token, True, 0), (token, True, 1), (token, True, 2)]


def test_the_end_of_trio_run_aborts_an_open_function_and_wakes_a_blocked_producer() -> None:
    """The shutdown guard: main returns with a function open and a producer blocked on
    its full queue. The producer wakes (with Closing, unless a last drain made room
    first), every accepted item is delivered or handed to call_js for cleanup, once,
    and the finalizer runs on the trio thread, all before trio.run returns."""
    handled: list[object] = []
    finalized: list[bool] = []
    outcome: list[BaseException | None] = []

    def call_js(token: object, callback: object, context: object, data: object) -> None:
        handled.append(data)

    def produce(fn: ThreadsafeFunction[int]) -> None:
        try:
            fn.call(1)  # the queue is full: waits for room
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    async def main() -> threading.Thread:
        fn = ThreadsafeFunction(
            call_js=call_js,
            max_queue_size=1,
            finalizer=lambda _: finalized.append(threading.current_thread() is trio_thread),
        )
        fn.call(0)
        worker = threading.Thread(target=produce, args=(fn,))
        worker.start()
        # Blocking the trio thread on purpose: no drain can make room meanwhile.
        wait_until(lambda: bool(fn._life.waiters))
        return worker

    trio_thread = threading.current_thread()
    worker = trio.run(main)
    worker.join(WAIT)
    assert not worker.is_alive()
    assert finalized == [True]
    assert len(outcome) == 1
    assert outcome[0] is None or isinstance(outcome[0], Closing)
    assert handled == ([0] if outcome[0] is not None else [0, 1])


def test_an_unreferenced_function_is_finalized_when_trio_run_ends() -> None:
    finalized = threading.Event()

    async def main() -> ThreadsafeFunction[object]:
        fn: ThreadsafeFunction[object] = ThreadsafeFunction(
            print, finalizer=lambda _: finalized.set()
        )
        return fn

    fn = trio.run(main)
    assert finalized.is_set()
    assert fn.closed
    with pytest.raises(Closing):
        fn.call(1)


def test_an_interrupt_from_a_finalizer_at_the_end_of_trio_run_follows_the_mains_error() -> None:
    """trio.run raises a finalizer's interrupt at the end of the run (the way trio raises a
    KeyboardInterrupt that arrives in its shutdown), with the main task's own error as its
    context, and no TrioInternalError."""

    def finalizer(_: object) -> None:
        raise KeyboardInterrupt("from the finalizer")

    async def main() -> None:
        ThreadsafeFunction(lambda _: None, finalizer=finalizer).unref()
        raise ValueError("from main")

    with pytest.raises(KeyboardInterrupt, match="from the finalizer") as caught:
        trio.run(main)
    assert isinstance(caught.value.__context__, ValueError)
    assert str(caught.value.__context__) == "from main"


def test_callback_errors_are_logged_to_the_tsfn_logger_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    def callback(x: int) -> None:
        if x == 1:
            raise ValueError("one")
        got.append(x)

    async def main() -> None:
        fn = ThreadsafeFunction(callback)
        for i in range(3):
            fn.call(i)
        fn.release()
        await fn.wait_closed()

    with caplog.at_level(logging.ERROR, logger="tsfn"):
        trio.run(main)
    assert got == [0, 2]
    [record] = [r for r in caplog.records if r.name == "tsfn"]
    assert "Exception in the callback" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


def test_async_work_runs_on_trios_worker_threads_under_its_default_limiter() -> None:
    def execute(limiter: trio.CapacityLimiter) -> tuple[float, bool]:
        return limiter.borrowed_tokens, threading.current_thread() is trio_thread

    async def main() -> tuple[float, bool]:
        limiter = trio.to_thread.current_default_thread_limiter()
        return await AsyncWork(execute, data=limiter)

    trio_thread = threading.current_thread()
    assert trio.run(main) == (1, False)


def test_a_cancelled_work_raises_asyncio_cancelled_error_on_trio_too() -> None:
    """API.md: awaiting a work cancelled before it started raises
    asyncio.CancelledError, whatever the loop (trio's Cancelled belongs to scopes)."""
    started = threading.Event()
    release = threading.Event()

    async def main() -> None:
        # One worker thread: the second work waits behind the first and is cancelled.
        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1

        def block(_: None) -> None:
            started.set()
            release.wait(WAIT)

        first = AsyncWork(block).queue()
        await trio.to_thread.run_sync(started.wait, WAIT, limiter=trio.CapacityLimiter(1))
        second = AsyncWork(block).queue()
        assert second.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await second
        await first

    trio.run(main)


def test_cancelling_the_consumer_stops_the_worker_and_reraises_trios_cancellation() -> None:
    emitted = threading.Event()
    worker_saw: list[BaseException] = []

    def produce(emit: Callable[[int], None]) -> None:
        emit(0)
        emitted.set()
        try:
            while True:
                emit(1)
        except Closing as exc:
            worker_saw.append(exc)
            raise

    async def main() -> bool:
        with trio.CancelScope() as scope:
            async with tsfn.stream(produce, max_queue_size=1) as items:
                async for _item in items:
                    scope.cancel()
        return scope.cancelled_caught

    assert trio.run(main) is True
    assert emitted.is_set()
    assert len(worker_saw) == 1


def test_a_function_made_on_another_thread_with_the_token_belongs_to_the_run() -> None:
    got: list[tuple[int, bool]] = []

    async def main() -> None:
        token = trio.lowlevel.current_trio_token()

        def make_and_call() -> ThreadsafeFunction[int]:
            def record(x: int) -> None:
                got.append((x, threading.current_thread() is trio_thread))

            fn = ThreadsafeFunction(record, loop=token)
            fn.call(7)
            fn.release()
            return fn

        fn = await trio.to_thread.run_sync(make_and_call)
        await fn.wait_closed()

    trio_thread = threading.current_thread()
    trio.run(main)
    assert got == [(7, True)]


def test_a_finished_runs_token_is_refused_as_loop() -> None:
    async def current_token() -> trio.lowlevel.TrioToken:
        return trio.lowlevel.current_trio_token()

    token = trio.run(current_token)
    with pytest.raises(ValueError, match="loop must not be a finished trio run"):
        ThreadsafeFunction(print, loop=token)


def test_outside_any_loop_the_error_names_both_loops() -> None:
    with pytest.raises(RuntimeError, match=r"asyncio loop or in trio\.run"):
        ThreadsafeFunction(print)


# -- tsfn.run's backend forms ---------------------------------------------------------


def _after_main_returns(delivered: list[object]) -> Callable[[], Any]:
    """An async function leaving a referenced function open when it returns: a thread
    calls and releases it only after main has returned, which `run` must wait for."""

    async def main() -> str:
        fn = ThreadsafeFunction(delivered.append)
        returned = threading.Event()

        def close_later() -> None:
            returned.wait(WAIT)
            try:
                fn.call("after main")
            except Closing:
                delivered.append("refused: run did not wait")
            fn.release()

        threading.Thread(target=close_later).start()
        # A loop callback: it runs on a later iteration, once main has returned.
        signal: ThreadsafeFunction[None] = ThreadsafeFunction(lambda _: returned.set())
        signal.call(None)
        signal.release()
        return "result"

    return main


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_takes_an_async_function_and_waits_for_referenced_work(backend: str) -> None:
    delivered: list[object] = []
    assert tsfn.run(_after_main_returns(delivered), backend=backend) == "result"
    assert delivered == ["after main"]


def test_run_passes_args_to_the_async_function() -> None:
    async def main(a: int, b: str) -> tuple[int, str]:
        return a, b

    assert tsfn.run(main, 1, "b", backend="trio") == (1, "b")
    assert tsfn.run(main, 2, "c") == (2, "c")


def test_run_passes_backend_options_to_trio_run() -> None:
    class Instrument(trio.abc.Instrument):
        def __init__(self) -> None:
            self.ran = False

        def before_run(self) -> None:
            self.ran = True

    instrument = Instrument()

    async def main() -> None:
        pass

    tsfn.run(main, backend="trio", backend_options={"instruments": [instrument]})
    assert instrument.ran


@pytest.mark.parametrize(
    ("options", "running"),
    [
        pytest.param(
            {"use_uvloop": True, "debug": False},
            "uvloop",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
            ),
        ),
        ({"debug": True}, "asyncio"),
        ({"debug": False}, "asyncio"),
    ],
)
def test_run_takes_anyios_asyncio_options(options: dict[str, Any], running: str) -> None:
    async def main() -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        return type(loop).__module__.split(".")[0], loop.get_debug()

    module, debug = tsfn.run(main, backend_options=options)
    assert module == running
    assert debug is options["debug"]


def test_run_refuses_what_it_cannot_run() -> None:
    async def main() -> None:
        pass

    with pytest.raises(ValueError, match="backend must be 'asyncio' or 'trio', got 'curio'"):
        tsfn.run(main, backend="curio")
    with pytest.raises(TypeError, match="backend='trio' takes the async function"):
        tsfn.run(main(), backend="trio")
    with pytest.raises(TypeError, match="args are for an async function"):
        tsfn.run(main(), 1)
    with pytest.raises(TypeError, match="debug and loop_factory are asyncio options"):
        tsfn.run(main, backend="trio", debug=True)
    with pytest.raises(TypeError, match="backend_options must be a mapping"):
        tsfn.run(main, backend_options=[("debug", True)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="backend_options for asyncio are"):
        tsfn.run(main, backend_options={"clock": None})
    with pytest.raises(TypeError, match="main must be an async function"):
        tsfn.run(lambda: 1)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="main must be a coroutine or an async function"):
        tsfn.run(1)  # type: ignore[arg-type]


def test_anyio_run_on_trio_streams_like_trio_run() -> None:
    async def main() -> list[int]:
        def produce(emit: Callable[[int], None]) -> None:
            for i in range(5):
                emit(i)

        async with tsfn.stream(produce) as items:
            return [item async for item in items]

    assert anyio.run(main, backend="trio") == [0, 1, 2, 3, 4]
