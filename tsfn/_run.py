"""`tsfn.run`: `asyncio.run` with Node's event-loop liveness.

Node keeps its process alive while a referenced threadsafe function is open or an
async work is pending; `tsfn.run` does the same for `main`'s loop: after `main`
returns it keeps the loop running until nothing holds it (see `_loop.Membership`), then
aborts the functions still open (those that were `unref`'d) and shuts the loop down
as `asyncio.run` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._asyncio import asyncio_run, running_port

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
    return asyncio_run(_live(main), debug=debug, loop_factory=loop_factory)


async def _live(main: Coroutine[Any, Any, R]) -> R:
    result = await main
    port = running_port("tsfn.run")
    await port.wait_idle()
    await port.shutdown()  # abort what is still open (unreferenced), finalizers included
    return result
