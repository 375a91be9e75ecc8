"""Bad arguments to every public entry point: the right exception, naming the argument.

API.md: "Bad arguments raise `TypeError` / `ValueError` with a message naming the
argument"; STYLE.md adds that the message shows the value (`max_queue_size must be
>= 0, got -1`). A wrong *type* is a TypeError, a value of the right type outside the
allowed range is a ValueError. Every case below checks the type, the argument's name
and the bad value's repr in the message.

The functions under test are built on a loop that is not running (`idle_loop`): the
checks must not depend on a loop running, and nothing is ever delivered. That loop is
asyncio's (or uvloop's): a trio run does not stand idle, and the checks come before
tsfn looks at the loop. The async tests run on every loop; trio's own arguments
(`loop=` a finished run's token, `backend=`, `backend_options=`) are in test_trio.py.
"""

from __future__ import annotations

import asyncio
import copy
import math
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _loops import LoopFactory

import tsfn

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


class _NotAnExecutor:
    """Has a `submit` method, yet is no `concurrent.futures.Executor`."""

    def submit(self, fn: Callable[..., object], /, *args: object) -> None:
        raise AssertionError("never used")


def _noop(*args: object) -> None:
    pass


def _emit_nothing(emit: Callable[[int], None]) -> None:
    pass


@pytest.fixture
def fn(idle_loop: asyncio.AbstractEventLoop) -> Iterator[tsfn.ThreadsafeFunction[Any]]:
    function: tsfn.ThreadsafeFunction[Any] = tsfn.ThreadsafeFunction(_noop, loop=idle_loop)
    yield function
    function.abort()


def _check_message(exc: BaseException, argument: str, value: object) -> None:
    message = str(exc)
    assert argument in message, f"{message!r} does not name {argument!r}"
    assert repr(value) in message, f"{message!r} does not show {value!r}"


# -- ThreadsafeFunction(...) ---------------------------------------------------------------

CONSTRUCTOR_CASES = [
    # (argument, bad value, exception)
    ("callback", 42, TypeError),
    ("callback", "print", TypeError),
    ("call_js", 42, TypeError),
    ("call_js", object(), TypeError),
    ("finalizer", 42, TypeError),
    ("finalizer", "close", TypeError),
    ("max_queue_size", -1, ValueError),
    ("max_queue_size", "2", TypeError),
    ("max_queue_size", 2.0, TypeError),
    ("max_queue_size", None, TypeError),
    ("max_queue_size", True, TypeError),  # a bool is not a count
    ("initial_thread_count", 0, ValueError),
    ("initial_thread_count", -3, ValueError),
    ("initial_thread_count", 1.5, TypeError),
    ("initial_thread_count", "1", TypeError),
    ("initial_thread_count", None, TypeError),
    ("initial_thread_count", True, TypeError),
    ("name", 42, TypeError),
    ("name", b"bytes", TypeError),
    ("loop", "the loop", TypeError),
    ("loop", 42, TypeError),
]


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    CONSTRUCTOR_CASES,
    ids=[f"{arg}={value!r}" for arg, value, _ in CONSTRUCTOR_CASES],
)
def test_threadsafe_function_rejects_a_bad_argument(
    idle_loop: asyncio.AbstractEventLoop, argument: str, value: object, error: type[Exception]
) -> None:
    kwargs: dict[str, Any] = {"loop": idle_loop, argument: value}
    callback = kwargs.pop("callback", _noop)
    with pytest.raises(error) as caught:
        tsfn.ThreadsafeFunction(callback, **kwargs)
    _check_message(caught.value, argument, value)


def test_threadsafe_function_needs_a_callback_or_call_js(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    with pytest.raises(TypeError) as caught:
        tsfn.ThreadsafeFunction(loop=idle_loop)  # type: ignore[call-overload]
    assert "callback" in str(caught.value)
    assert "call_js" in str(caught.value)


def test_threadsafe_function_accepts_call_js_alone_and_the_boundary_values(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    """The lower bounds themselves are valid: an unbounded queue, a single producer."""
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        call_js=_noop, max_queue_size=0, initial_thread_count=1, name="ok", loop=idle_loop
    )
    assert (fn.name, fn.thread_count) == ("ok", 1)
    fn.abort()


def test_counts_larger_than_any_float_are_accepted_and_work(
    idle_loop: asyncio.AbstractEventLoop,
) -> None:
    """Siblings of issue 9, defect 13: whatever a check accepts must work later, with no
    OverflowError from arithmetic that names no argument. Counts are exact ints."""
    huge = 10**400
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(
        _noop, max_queue_size=huge, initial_thread_count=huge, loop=idle_loop
    )
    for method in ("call", "submit"):
        getattr(fn, method)(1, timeout=huge)  # room: no wait, but the same checks
    fn.call_nowait(2)
    fn.release()
    assert (fn.qsize(), fn.thread_count, fn.closing) == (3, huge - 1, False)
    assert "threads=" in repr(fn)
    fn.abort()


def test_threadsafe_function_rejects_a_closed_loop(
    loop_factory: LoopFactory,
) -> None:
    # A closed loop is the right type with a value that cannot work: ValueError. (An
    # asyncio loop: trio's counterpart, a finished run's token, is in test_trio.py.)
    loop = loop_factory()
    loop.close()
    with pytest.raises(ValueError, match="loop must not be closed"):
        tsfn.ThreadsafeFunction(_noop, loop=loop)


def test_threadsafe_function_without_a_running_loop_says_how_to_give_one() -> None:
    with pytest.raises(RuntimeError, match="loop"):
        tsfn.ThreadsafeFunction(_noop)


# -- call / call_nowait / submit ---------------------------------------------------------

CALL_CASES = [
    ("block", 1, TypeError),
    ("block", "yes", TypeError),
    ("block", None, TypeError),
    ("timeout", -1, ValueError),
    ("timeout", -0.5, ValueError),
    ("timeout", math.nan, ValueError),
    ("timeout", "1", TypeError),
    ("timeout", True, TypeError),
    ("timeout", [1], TypeError),
]


@pytest.mark.parametrize("method", ["call", "submit"])
@pytest.mark.parametrize(
    ("argument", "value", "error"),
    CALL_CASES,
    ids=[f"{arg}={value!r}" for arg, value, _ in CALL_CASES],
)
def test_call_and_submit_reject_a_bad_argument(
    fn: tsfn.ThreadsafeFunction[Any],
    method: str,
    argument: str,
    value: object,
    error: type[Exception],
) -> None:
    with pytest.raises(error) as caught:
        getattr(fn, method)("data", **{argument: value})
    _check_message(caught.value, argument, value)
    assert fn.qsize() == 0, "a rejected call must not queue its item"


@pytest.mark.parametrize("timeout", [0, 0.0, 1, 2.5, math.inf, None])
def test_call_accepts_every_valid_timeout(
    fn: tsfn.ThreadsafeFunction[Any], timeout: float | None
) -> None:
    fn.call("data", timeout=timeout)
    assert fn.qsize() == 1


# -- AsyncWork ---------------------------------------------------------------------------

WORK_CASES: list[tuple[str, object, type[Exception]]] = [
    ("execute", None, TypeError),
    ("execute", 42, TypeError),
    ("execute", "run", TypeError),
    ("complete", 42, TypeError),
    ("complete", "done", TypeError),
    ("executor", 42, TypeError),
    ("executor", _NotAnExecutor(), TypeError),
    ("executor", "threads", TypeError),
    ("name", 42, TypeError),
    ("name", b"bytes", TypeError),
]


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    WORK_CASES,
    ids=[f"{arg}={value!r}" for arg, value, _ in WORK_CASES],
)
def test_async_work_rejects_a_bad_argument(
    argument: str, value: object, error: type[Exception]
) -> None:
    kwargs: dict[str, Any] = {"execute": _noop, argument: value}
    execute = kwargs.pop("execute")
    complete = kwargs.pop("complete", None)
    with pytest.raises(error) as caught:
        tsfn.AsyncWork(execute, complete, **kwargs)
    _check_message(caught.value, argument, value)


async def test_a_function_refuses_to_be_pickled_saying_what_crosses_processes() -> None:
    """A copy in another process would take calls that reach no loop (the items lost):
    pickling it (a process pool's job, copy.copy) fails at once, saying what to use."""
    fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(lambda _: None)
    for thing in (fn, fn.call):
        with pytest.raises(TypeError, match=r"cannot be pickled.*tsfn\.stream"):
            pickle.dumps(thing)
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.copy(fn)
    fn.release()


async def test_async_work_queued_twice_raises_runtime_error() -> None:
    work: tsfn.AsyncWork[None, int] = tsfn.AsyncWork(lambda _: 7)
    assert work.queue() is work
    with pytest.raises(RuntimeError, match="queued"):
        work.queue()
    assert await work == 7  # the first queue() is unaffected


async def test_async_work_queued_after_await_raises_runtime_error() -> None:
    """Awaiting a work queues it, so a later queue() is the second one."""
    work: tsfn.AsyncWork[None, int] = tsfn.AsyncWork(lambda _: 7)
    assert await work == 7
    with pytest.raises(RuntimeError, match="queued"):
        work.queue()


# -- stream ------------------------------------------------------------------------------

STREAM_CASES: list[tuple[str, object, type[Exception]]] = [
    ("func", None, TypeError),
    ("func", 42, TypeError),
    ("max_queue_size", -1, ValueError),
    ("max_queue_size", "64", TypeError),
    ("max_queue_size", 1.5, TypeError),
    ("max_queue_size", None, TypeError),
    ("latest", 1, TypeError),
    ("latest", "yes", TypeError),
    ("latest", None, TypeError),
    ("executor", 42, TypeError),
    ("executor", _NotAnExecutor(), TypeError),
]


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    STREAM_CASES,
    ids=[f"{arg}={value!r}" for arg, value, _ in STREAM_CASES],
)
def test_stream_rejects_a_bad_argument(
    argument: str, value: object, error: type[Exception]
) -> None:
    kwargs: dict[str, Any] = {"func": _emit_nothing, argument: value}
    func = kwargs.pop("func")
    with pytest.raises(error) as caught:
        tsfn.stream(func, **kwargs)
    _check_message(caught.value, argument, value)


# -- run ---------------------------------------------------------------------------------


async def _answer() -> int:
    return 42


@pytest.mark.parametrize("main", [42, None, "main()"], ids=["int", "None", "str"])
def test_run_rejects_main_that_is_not_a_coroutine(main: object) -> None:
    with pytest.raises(TypeError) as caught:
        tsfn.run(main)  # type: ignore[arg-type]
    _check_message(caught.value, "main", main)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("loop_factory", 42), ("loop_factory", "uvloop"), ("debug", "yes"), ("debug", 1)],
    ids=["loop_factory=42", "loop_factory='uvloop'", "debug='yes'", "debug=1"],
)
def test_run_rejects_a_bad_argument(argument: str, value: object) -> None:
    kwargs: dict[str, Any] = {argument: value}
    main = _answer()
    try:
        with pytest.raises(TypeError) as caught:
            tsfn.run(main, **kwargs)
    finally:
        main.close()  # never started: no "coroutine was never awaited" warning
    _check_message(caught.value, argument, value)


def test_run_accepts_its_valid_arguments(
    loop_factory: LoopFactory,
) -> None:
    """`debug` and `loop_factory`: asyncio's options."""
    assert tsfn.run(_answer(), debug=True, loop_factory=loop_factory) == 42
    assert tsfn.run(_answer(), debug=None, loop_factory=None) == 42
