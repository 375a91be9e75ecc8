"""`tsfn.run`: `asyncio.run` (or `trio.run`) with Node's event-loop liveness.

Node keeps its process alive while a referenced threadsafe function is open or an
async work is pending; `tsfn.run` does the same for `main`'s loop: after `main`
returns it keeps the loop running until nothing holds it (see `_loop.Membership`), then
aborts the functions still open (those that were `unref`'d) and shuts the loop down
as `asyncio.run` (or `trio.run`) does.

Two call forms: today's `run(main(), debug=..., loop_factory=...)` with a coroutine
(asyncio), and anyio's `run(async_fn, *args, backend=..., backend_options=...)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from ._asyncio import asyncio_run
from ._running import running_port

__all__ = ["run"]

R = TypeVar("R")

_BACKENDS = ("asyncio", "trio")
# anyio's asyncio options (anyio.run(..., backend_options=...)); trio's go to trio.run.
_ASYNCIO_OPTIONS = frozenset({"debug", "loop_factory", "use_uvloop"})


def run(
    main: Coroutine[Any, Any, R] | Callable[..., Awaitable[R]],
    *args: Any,
    backend: str = "asyncio",
    backend_options: Mapping[str, Any] | None = None,
    debug: bool | None = None,
    loop_factory: Callable[[], Any] | None = None,
) -> R:
    """Run `main` on a new loop, then until no referenced work is left; return its result.

    `main` is a coroutine (`run(main())`, asyncio only) or an async function called
    with `args` on the loop (`run(main, 1, backend="trio")`, as `anyio.run` takes it).
    `backend` is "asyncio" (default) or "trio"; `backend_options` are anyio's: for
    asyncio `debug`, `loop_factory` and `use_uvloop`, for trio keyword arguments of
    `trio.run`. `debug` and `loop_factory` may also be given directly (asyncio).

    After `main` returns, the loop keeps running while any referenced
    ThreadsafeFunction is open or any queued AsyncWork has not completed. Then the
    functions still open (unreferenced ones) are aborted, their finalizers run, and
    the loop shuts down. If `main` raises, the loop shuts down at once (open
    functions are aborted) and the exception propagates.
    """
    try:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be 'asyncio' or 'trio', got {backend!r}")
        options = _check_options(backend_options)
        if inspect.iscoroutine(main):
            if args:
                raise TypeError(f"args are for an async function, not a coroutine, got {args!r}")
            if backend != "asyncio":
                raise TypeError(f"backend={backend!r} takes the async function: run(main, ...)")
        elif not callable(main):
            raise TypeError(f"main must be a coroutine or an async function, got {main!r}")
        if backend == "asyncio":
            debug, loop_factory = _asyncio_options(options, debug, loop_factory)
        elif debug is not None or loop_factory is not None:
            raise TypeError("debug and loop_factory are asyncio options, not trio's")
    except BaseException:
        if inspect.iscoroutine(main):
            main.close()  # refused: not "never awaited" on top of the error
        raise
    if backend == "trio":
        import trio

        result: R = trio.run(_live, main, args, **options)
    else:
        result = asyncio_run(_live(main, args), debug=debug, loop_factory=loop_factory)
    return result


def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"backend_options must be a mapping or None, got {options!r}")
    return dict(options)


def _asyncio_options(
    options: dict[str, Any], debug: bool | None, loop_factory: Callable[[], Any] | None
) -> tuple[bool | None, Callable[[], Any] | None]:
    if set(options) - _ASYNCIO_OPTIONS:
        raise TypeError(
            f"backend_options for asyncio are {sorted(_ASYNCIO_OPTIONS)}, got {options!r}"
        )
    debug = options.get("debug", debug)
    loop_factory = options.get("loop_factory", loop_factory)
    if options.get("use_uvloop"):
        if loop_factory is not None:
            raise TypeError("backend_options: give use_uvloop or loop_factory, not both")
        import uvloop

        loop_factory = uvloop.new_event_loop
    if loop_factory is not None and not callable(loop_factory):
        raise TypeError(f"loop_factory must be a callable or None, got {loop_factory!r}")
    if debug is not None and not isinstance(debug, bool):
        raise TypeError(f"debug must be a bool or None, got {debug!r}")
    return debug, loop_factory


async def _live(main: Coroutine[Any, Any, R] | Callable[..., Awaitable[R]], args: Any) -> R:
    awaitable = main if inspect.iscoroutine(main) else main(*args)  # type: ignore[operator]
    if not inspect.isawaitable(awaitable):
        raise TypeError(f"main must be an async function, but main(*args) returned {awaitable!r}")
    result = await awaitable
    port = running_port("tsfn.run")
    await port.wait_idle()
    await port.shutdown()  # abort what is still open (unreferenced), finalizers included
    return result
