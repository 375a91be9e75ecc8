"""Which event loop is running: the port of the running asyncio loop or trio run.

The user writes nothing loop-specific: a ThreadsafeFunction, AsyncWork or stream made
on the loop thread belongs to the loop running there. asyncio is asked first (one
C call); trio only when its module is loaded, so tsfn never imports trio itself
unless the program does.
"""

from __future__ import annotations

import asyncio
import sys

from ._asyncio import AsyncioPort
from ._loop import Port

__all__ = ["port_of", "running_port"]


def running_port(owner: str) -> Port:
    """The port of the running loop, with a clear error if there is none."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return AsyncioPort.of(loop)
    if "trio" in sys.modules:
        import trio

        from ._trio import TrioPort

        try:
            return TrioPort.of(trio.lowlevel.current_trio_token())
        except RuntimeError:
            pass  # trio is imported, but this thread runs no trio.run
    raise RuntimeError(
        f"{owner} needs an event loop: create it inside a coroutine running on an "
        "asyncio loop or in trio.run, or pass loop=..."
    )


def port_of(loop: object) -> Port:
    """The port of an explicit `loop=` argument (an asyncio loop or a TrioToken), checked."""
    if isinstance(loop, asyncio.AbstractEventLoop):
        if loop.is_closed():
            raise ValueError(f"loop must not be closed, got {loop!r}")
        return AsyncioPort.of(loop)
    trio = sys.modules.get("trio")
    if trio is not None and isinstance(loop, trio.lowlevel.TrioToken):
        from ._trio import TrioPort

        port = TrioPort.of(loop)
        if port.is_closed():
            raise ValueError(f"loop must not be a finished trio run's token, got {loop!r}")
        return port
    raise TypeError(
        f"loop must be an asyncio event loop, a trio.lowlevel.TrioToken or None, got {loop!r}"
    )
