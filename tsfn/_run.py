"""`tsfn.run`: `asyncio.run` with Node's event-loop liveness.

Node keeps its process alive while a referenced threadsafe function is open or an
async work is pending; `tsfn.run` does the same for `main`'s loop: after `main`
returns it keeps the loop running until nothing holds it (see `LoopPort.hold`), then
aborts the functions still open (those that were `unref`'d) and shuts the loop down
as `asyncio.run` does.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._loop import LoopPort

__all__ = ["run"]

R = TypeVar("R")


def run(
    main: Coroutine[Any, Any, R],
    *,
    debug: bool | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> R:
    """Run `main` like `asyncio.run`, then until no referenced work is left; return its result.

    After `main` returns, the loop keeps running while any referenced
    ThreadsafeFunction is open or any queued AsyncWork has not completed. Then the
    functions still open (unreferenced ones) are aborted, their finalizers run, and
    the loop shuts down. If `main` raises, the loop shuts down at once (open
    functions are aborted) and the exception propagates.
    """
    if not asyncio.iscoroutine(main):
        hint = " (call it: run(main()))" if callable(main) else ""
        raise TypeError(f"main must be a coroutine{hint}, got {main!r}")
    if loop_factory is not None and not callable(loop_factory):
        raise TypeError(f"loop_factory must be a callable or None, got {loop_factory!r}")
    if debug is not None and not isinstance(debug, bool):
        raise TypeError(f"debug must be a bool or None, got {debug!r}")
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=loop_factory) as runner:
            return runner.run(_live(main))
    return _run_310(_live(main), debug, loop_factory)  # pragma: no cover - 3.10 only


async def _live(main: Coroutine[Any, Any, R]) -> R:
    result = await main
    port = LoopPort.of(asyncio.get_running_loop())
    await port.wait_idle()
    port.shutdown()  # abort what is still open (unreferenced), finalizers included
    return result


def _run_310(
    main: Coroutine[Any, Any, R],
    debug: bool | None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
) -> R:  # pragma: no cover - Python 3.10 has no asyncio.Runner
    if loop_factory is None:
        return asyncio.run(main, debug=bool(debug))
    loop = loop_factory()
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
