"""Shared fixtures: every async test runs on each event loop tsfn supports.

`anyio_backend` is anyio's pytest-plugin hook: a test marked `@pytest.mark.anyio`
runs once per parameter here, so each behaviour is checked on asyncio's default loop
and on uvloop. Sync tests that manage a loop themselves (shutdown, `tsfn.run`) take
`loop_factory` instead, parametrised the same way.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not available on Windows
    uvloop = None

_LOOPS: list[Any] = [pytest.param("asyncio", id="asyncio")]
if uvloop is not None:
    _LOOPS.append(pytest.param("uvloop", id="uvloop"))


@pytest.fixture(params=_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


@pytest.fixture(params=_LOOPS)
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for a new event loop of each supported kind."""
    if request.param == "uvloop":
        assert uvloop is not None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.fixture
def idle_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> Iterator[asyncio.AbstractEventLoop]:
    """A loop of each kind that is not running; at the end it shuts down as asyncio.run would.

    Nothing is delivered until the test runs it, so a bounded queue stays full, and a
    caller blocked for room stays blocked, for as long as the test wants.
    """
    loop = loop_factory()
    try:
        yield loop
    finally:
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    """Make the interpreter switch threads as often as it can, to provoke races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Fail a test that leaves a thread of its own running (a hang waiting to happen)."""
    before = set(threading.enumerate())
    yield
    leftover = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.daemon and not _is_pool_thread(t)
    ]
    for thread in leftover:
        thread.join(timeout=5)
    still = [t.name for t in leftover if t.is_alive()]
    assert not still, f"threads left running: {still}"


def _is_pool_thread(thread: threading.Thread) -> bool:
    # Executor workers outlive a test by design (asyncio's default executor is joined
    # at loop shutdown, which for anyio's runner may come after the test).
    return thread.name.startswith(("asyncio_", "ThreadPoolExecutor", "AnyIO"))
