"""Shared fixtures: every async test runs on each event loop tsfn supports.

Two plugins run the async tests, and no test is run by both. anyio's plugin runs
every module marked `pytest.mark.anyio` (one marker per module): `anyio_backend`
below parametrises those tests over asyncio's default loop, uvloop and trio (through
anyio's trio backend), so they use only what any loop offers: anyio's events, task
groups, timeouts and threads, and the helpers of tests/_helpers.py. A test that only
makes sense on asyncio says why with `@pytest.mark.asyncio_only("reason")`; its trio
run is skipped with that reason. Sync tests that need a whole run of a new loop
(shutdown at its end, say) take `run_on_new_loop`, parametrised over the three too.
pytest-asyncio (strict mode: only what is marked `pytest.mark.asyncio`) runs the
tests that are asyncio-only by nature, such as those that swap the loop's
exception handler (tests/test_asyncio_loop.py): a new loop per test, in debug
mode (pyproject's `asyncio_debug`), made by each factory that
`pytest_asyncio_loop_factories` below names: the same two loops. Sync tests
that manage a loop themselves (shutdown, `tsfn.run`) take `loop_factory`, or
`idle_loop` for a loop that never runs, parametrised the same way.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import ModuleType
from typing import Any, TypeVar

import pytest
from _helpers import Backend, loop_factory_of, run_to_end

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not available on Windows
    uvloop = None

R = TypeVar("R")

_LOOPS: list[Any] = [pytest.param("asyncio", id="asyncio")]
if uvloop is not None:
    _LOOPS.append(pytest.param("uvloop", id="uvloop"))


_ALL_LOOPS: list[Any] = [*_LOOPS, pytest.param("trio", id="trio")]
# What anyio's plugin takes for each loop (its `anyio_backend` form), by test id.
_BACKENDS: dict[str, Backend] = {
    "asyncio": ("asyncio", {"use_uvloop": False}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
_FACTORIES = {
    name: loop_factory_of(_BACKENDS[name]) for name in ("asyncio", "uvloop")[: len(_LOOPS)]
}


@pytest.fixture(params=_ALL_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Backend:
    return _BACKENDS[request.param]


@pytest.fixture(params=_ALL_LOOPS)
def run_on_new_loop(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[R]]], R]:
    """Run `main()` on a new loop of each kind to the end, as the loop's own runner
    does (asyncio.run's steps on asyncio and uvloop, `trio.run` on trio)."""
    return functools.partial(run_to_end, _BACKENDS[request.param])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, with its reason, the trio run of a test marked `asyncio_only`."""
    for item in items:
        marker = item.get_closest_marker("asyncio_only")
        params = getattr(item, "callspec", None)
        if marker is None or params is None:
            continue
        if "trio" in (params.params.get("anyio_backend"), params.params.get("run_on_new_loop")):
            item.add_marker(pytest.mark.skip(reason=f"asyncio only: {marker.args[0]}"))


@pytest.fixture(params=_LOOPS)
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for a new event loop of each supported kind."""
    return _FACTORIES[request.param]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio's hook: each `pytest.mark.asyncio` test runs once per loop here."""
    return _FACTORIES


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
