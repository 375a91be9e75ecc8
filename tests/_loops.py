"""Running a coroutine on a new loop of a given kind, as `asyncio.run` would.

`asyncio.run(main, loop_factory=...)` exists from Python 3.12 and `asyncio.Runner`
from 3.11; tests that end loops on purpose need the same shutdown steps on 3.10 too.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

R = TypeVar("R")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def asyncio_run(main: Coroutine[Any, Any, R], loop_factory: LoopFactory) -> R:
    """`asyncio.run(main, loop_factory=...)` on every Python tsfn supports."""
    if sys.version_info >= (3, 12):
        return asyncio.run(main, loop_factory=loop_factory)
    if sys.version_info >= (3, 11):
        # What asyncio.run itself does on 3.11, which has no loop_factory argument.
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main)
    # Python 3.10: the steps asyncio.run (and Runner.close) take, with our loop.
    loop = loop_factory()  # pragma: no cover - 3.10 only
    try:  # pragma: no cover - 3.10 only
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:  # pragma: no cover - 3.10 only
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:  # gather() of nothing would make a future on another loop
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
