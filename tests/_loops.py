"""Running a coroutine on a new loop of a given kind, as `asyncio.run` would.

The library's own runner (`tsfn._asyncio.asyncio_run`) takes the same steps on every
Python tsfn supports; the tests that end loops on purpose use it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tsfn._asyncio import asyncio_run as _asyncio_run

R = TypeVar("R")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def asyncio_run(main: Coroutine[Any, Any, R], loop_factory: LoopFactory) -> R:
    """`asyncio.run(main, loop_factory=...)` on every Python tsfn supports."""
    return _asyncio_run(main, loop_factory=loop_factory)
