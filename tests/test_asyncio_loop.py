"""What reaches asyncio's loop exception handler: faults nobody awaits.

A fault in user code that no caller awaits (a raising callback, `call_js`, finalizer
or `complete`) goes to the loop's exception handler, naming the function or work;
one a caller awaits (a `submit` future) goes to that caller alone. Either way
delivery goes on, discarded items still reach `call_js`, and the finalizer runs once.

These tests are asyncio-only by nature: they swap the loop's handler
(`loop.set_exception_handler`, through `loop_errors`), and two hand tsfn a future of
another asyncio loop. So pytest-asyncio runs them (`pytest.mark.asyncio`, a new loop
per test, debug on) on each loop factory conftest.py names, not anyio's plugin, whose
backends are to include trio; see conftest.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import Boom, loop_errors, start_threads

import tsfn

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(20)]


def reported(reports: list[dict[str, Any]]) -> list[BaseException]:
    return [context["exception"] for context in reports if "exception" in context]


def produce(fn: tsfn.ThreadsafeFunction[int], items: range) -> threading.Thread:
    """Call `fn` with every item from a new thread, then release it."""

    def run() -> None:
        for item in items:
            fn.call(item)
        fn.release()

    [thread] = start_threads([run])
    return thread


# -- ThreadsafeFunction: callback, call_js, finalizer -------------------------------------


async def test_raising_callback_is_reported_and_later_items_are_still_delivered() -> None:
    delivered: list[int] = []
    finalized: list[int] = []

    def callback(item: int) -> None:
        if item % 3 == 0:
            raise Boom(item)
        delivered.append(item)

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn = tsfn.ThreadsafeFunction(
            callback, max_queue_size=4, finalizer=lambda _: finalized.append(len(delivered))
        )
        thread = produce(fn, range(300))
        await fn.wait_closed()
        thread.join()

    assert delivered == [i for i in range(300) if i % 3]
    errors = reported(reports)
    assert [e.args[0] for e in errors if isinstance(e, Boom)] == list(range(0, 300, 3))
    assert len(errors) == 100  # nothing else was reported
    assert finalized == [200]  # once, after every delivery
    assert fn.qsize() == 0


async def test_raising_callback_fails_only_its_own_submit_future_not_the_loop_handler() -> None:
    boom = Boom(2)

    def callback(item: int) -> int:
        if item == 2:
            raise boom
        return item * 10

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn = tsfn.ThreadsafeFunction(callback)
        futures = [fn.submit(i) for i in range(5)]
        with pytest.raises(Boom) as caught:
            await asyncio.wrap_future(futures[2])
        fn.release()
        await fn.wait_closed()

    assert caught.value is boom
    assert [f.result() for i, f in enumerate(futures) if i != 2] == [0, 10, 30, 40]
    assert reports == []  # the awaiting caller got it; the loop need not hear of it


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A second event loop, never run: its futures cannot be awaited on the test's loop."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


async def test_submit_whose_callback_returns_another_loops_future_fails_that_future(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 9, defect 4: a callback returned an awaitable this loop cannot schedule (a
    future of another loop): the error escaped the drain to the loop's handler, and
    the submitter's future never resolved. The future gets the error, the loop hears
    nothing, and the function still closes."""
    with loop_errors(asyncio.get_running_loop()) as reports:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            lambda _: other_loop.create_future()
        )
        future = fn.submit(1)
        with pytest.raises(ValueError, match="loop"):
            await asyncio.wait_for(asyncio.wrap_future(future), 10)
        fn.release()
        await asyncio.wait_for(fn.wait_closed(), 10)
    assert reports == []


async def test_callback_returning_another_loops_future_is_reported_as_a_callback_fault(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 9, defect 4, without a future to tell: the fault is the callback's, reported
    like a raising callback (naming the function), not as an exception in the drain;
    later items are still delivered and the function closes."""
    delivered: list[int] = []

    def callback(item: int) -> object:
        delivered.append(item)
        return other_loop.create_future() if item == 0 else None

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn = tsfn.ThreadsafeFunction(callback)
        for item in range(3):
            fn.call(item)
        fn.release()
        await asyncio.wait_for(fn.wait_closed(), 10)
    assert delivered == [0, 1, 2]
    assert [context.get("tsfn") for context in reports] == [fn], reports
    assert [type(e) for e in reported(reports)] == [ValueError]
    assert reports[0]["message"].startswith("Exception in the callback")


async def test_raising_async_callback_is_reported_before_the_finalizer_runs() -> None:
    events: list[str] = []

    async def callback(item: int) -> None:
        await asyncio.sleep(0)
        if item == 1:
            events.append("raise")
            raise Boom(item)
        events.append(f"item {item}")

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn = tsfn.ThreadsafeFunction(callback, finalizer=lambda _: events.append("finalizer"))
        for item in range(3):
            fn.call(item)
        fn.release()
        await fn.wait_closed()

    assert sorted(events[:-1]) == ["item 0", "item 2", "raise"]
    assert events[-1] == "finalizer"
    assert [type(e) for e in reported(reports)] == [Boom]


async def test_call_js_raising_while_discarding_is_reported_and_the_rest_still_discarded() -> None:
    discarded: list[int] = []
    events: list[str] = []

    def call_js(
        loop: asyncio.AbstractEventLoop | None, _cb: object, _context: object, item: int
    ) -> None:
        assert loop is None, "nothing may be delivered after abort()"
        discarded.append(item)
        if item % 2:
            raise Boom(item)

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn = tsfn.ThreadsafeFunction(call_js=call_js, finalizer=lambda _: events.append("final"))
        # Queued on the loop thread, which does not drain until we await: all ten
        # are still queued when abort() comes.
        for item in range(10):
            fn.call_nowait(item)
        fn.abort()
        await fn.wait_closed()

    assert discarded == list(range(10))
    assert [e.args[0] for e in reported(reports) if isinstance(e, Boom)] == [1, 3, 5, 7, 9]
    assert events == ["final"]
    assert fn.qsize() == 0


async def test_raising_finalizer_is_reported_and_the_function_still_closes() -> None:
    calls: list[object] = []

    def finalizer(context: object) -> None:
        calls.append(context)
        raise Boom("finalizer")

    with loop_errors(asyncio.get_running_loop()) as reports:
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
            lambda _: None, context="ctx", finalizer=finalizer
        )
        fn.call(1)
        fn.release()
        await fn.wait_closed()

    assert calls == ["ctx"]
    assert fn.closed
    assert [type(e) for e in reported(reports)] == [Boom]
    with pytest.raises(tsfn.Closing):
        fn.call(2)


async def test_callback_exception_goes_to_the_loop_handler_and_delivery_continues() -> None:
    got: list[int] = []
    boom = ValueError("item 2 is bad")

    def callback(item: int) -> None:
        if item == 2:
            raise boom
        got.append(item)

    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(callback, name="flaky")
    with loop_errors(asyncio.get_running_loop()) as errors:
        for i in range(5):
            fn.call(i)
        fn.release()
        await fn.wait_closed()
    assert got == [0, 1, 3, 4]
    assert [error["exception"] for error in errors] == [boom]
    assert "flaky" in errors[0]["message"]


async def test_call_js_and_finalizer_exceptions_go_to_the_loop_handler() -> None:
    delivery, discard, final = ValueError("delivery"), KeyError("discard"), OSError("final")

    def call_js(loop: object, callback: object, context: object, data: int) -> None:
        raise delivery if loop is not None else discard

    def finalizer(_: object) -> None:
        raise final

    first: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(call_js=call_js)
    second: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        call_js=call_js, finalizer=finalizer
    )
    with loop_errors(asyncio.get_running_loop()) as errors:
        first.call(1)
        first.release()
        await first.wait_closed()
        second.call(1)
        second.abort()
        await second.wait_closed()
    assert [error["exception"] for error in errors] == [delivery, discard, final]


# -- AsyncWork: complete --------------------------------------------------------------------


async def test_an_exception_in_complete_goes_to_the_loops_exception_handler() -> None:
    boom = RuntimeError("complete failed")

    def complete(status: tsfn.Status, data: object) -> None:
        raise boom

    with loop_errors(asyncio.get_running_loop()) as contexts:
        work = tsfn.AsyncWork(lambda d: d, complete, data="result", name="failing-complete")
        # The awaiter still gets execute's result: complete's failure is the loop's.
        assert await work == "result"
    assert len(contexts) == 1
    assert contexts[0]["exception"] is boom
    assert "failing-complete" in contexts[0]["message"]


# -- the plumbing (tests/conftest.py, pyproject's pytest-asyncio options) --------------------


async def test_each_test_runs_on_a_new_debug_loop_of_the_kind_its_id_names(
    request: pytest.FixtureRequest,
) -> None:
    loop = asyncio.get_running_loop()
    kind = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
    # One factory only (no uvloop, as on free-threaded builds): pytest adds no id.
    name = request.node.name
    assert name.endswith(f"[{kind}]") if "[" in name else kind == "asyncio", (name, type(loop))
    assert loop.get_debug()
