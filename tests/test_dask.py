"""`stream` and `AsyncWork` on a real Dask cluster: a `distributed.LocalCluster` of two
worker processes, started once for the module, reached through a `Client` and through
its `get_executor()`. The workers reach this process's hub over loopback TCP.

The cluster is made with ``allowed-failures: 0``: a task whose worker dies fails with
`KilledWorker` at once instead of being run again elsewhere (a stream cannot be
replayed: a second run is turned away, see docs/howto/dask.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import WAIT

import tsfn
from tsfn import Closing

distributed = pytest.importorskip(
    "distributed", reason="Dask's distributed is not installed (pip install 'tsfn[dask]')"
)
dask = pytest.importorskip("dask")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(60),
    # With dashboard_address=None the scheduler's HTTP server still tries port 8787,
    # and warns when another cluster on this machine has it (then takes another).
    pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning"),
]

Emit = Any


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})  # the remote side never touches the loop (see test_process.py)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(params=["client", "get_executor"])
def executor(request: pytest.FixtureRequest, client: Any) -> Any:
    client.wait_for_workers(2, timeout=WAIT)  # a test that killed one: it is back
    return client if request.param == "client" else client.get_executor()


# -- functions the Dask workers run ----------------------------------------------------


def count_to(emit: Emit, n: int) -> str:
    for i in range(n):
        emit(i)
    return f"counted to {n}"


def fail_after(emit: Emit, n: int) -> None:
    for i in range(n):
        emit(i)
    raise KeyError("missing")


def endless(emit: Emit, name: str) -> None:
    try:
        i = 0
        while True:
            emit(i)
            i += 1
    except Closing:
        distributed.Variable(name).set(tsfn.cancelled())
        raise


def wait_for_cancel(name: str) -> bool:
    distributed.Variable(f"{name}-started").set(True)
    deadline = time.monotonic() + WAIT
    while not tsfn.cancelled():
        if time.monotonic() > deadline:
            return False
    distributed.Variable(name).set(True)
    return True


def block(name: str) -> None:
    distributed.Event(name).wait(WAIT)


def record_run(name: str) -> None:
    distributed.Event(name).set()


def die(emit: Emit, name: str) -> None:
    for i in range(3):
        emit(i)
    # Items still buffered in this process die with it: die once all three arrived.
    assert distributed.Event(name).wait(WAIT), "the items never arrived"
    os._exit(3)


# -- the tests -------------------------------------------------------------------------


async def test_every_item_arrives_in_order_then_the_result(executor: Any) -> None:
    async with tsfn.stream(count_to, 5000, executor=executor) as items:
        got = [item async for item in items]
    assert got == list(range(5000))
    assert items.result == "counted to 5000"


async def read_all(
    stream: tsfn.Stream[Any, Any], got: list[Any], after_three: Callable[[], object] = lambda: None
) -> None:
    """Reads every item into `got`, calling `after_three` once three have come."""
    async with stream as items:
        async for item in items:
            got.append(item)
            if len(got) == 3:
                await asyncio.to_thread(after_three)  # it may be a Dask client's call


async def test_an_exception_arrives_after_the_items_with_the_remote_traceback(
    executor: Any,
) -> None:
    got: list[int] = []
    with pytest.raises(KeyError, match="missing") as raised:
        await read_all(tsfn.stream(fail_after, 3, executor=executor), got)
    assert got == [0, 1, 2]
    notes: list[str] = getattr(raised.value, "__notes__", [])
    assert "in fail_after" in notes[0]


async def test_latest_ends_with_the_last_item(executor: Any) -> None:
    async with tsfn.stream(count_to, 3000, executor=executor, latest=True) as items:
        got = [item async for item in items]
    assert got == sorted(set(got))
    assert got[-1] == 2999


async def test_leaving_early_raises_closing_in_the_dask_worker_with_cancelled_true(
    executor: Any, client: Any, request: pytest.FixtureRequest
) -> None:
    name = request.node.name
    async with tsfn.stream(endless, name, executor=executor, max_queue_size=4) as items:
        async for item in items:
            if item == 10:
                break
    # The block returned after the remote function did: the variable is set.
    assert distributed.Variable(name, client=client).get(timeout=WAIT) is True


async def test_cancelled_turns_true_in_a_work_on_a_dask_worker(
    executor: Any, client: Any, request: pytest.FixtureRequest
) -> None:
    name = request.node.name
    done = asyncio.Event()
    work = tsfn.AsyncWork(
        wait_for_cancel, lambda status, _: done.set(), data=name, executor=executor
    )
    task = asyncio.ensure_future(work)
    started = distributed.Variable(f"{name}-started", client=client)
    await asyncio.to_thread(started.get, timeout=WAIT)
    assert not work.cancel()  # it runs (a Dask future's own cancel() would say True)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(done.wait(), WAIT)
    assert work.status is tsfn.Status.OK
    assert distributed.Variable(name, client=client).get(timeout=WAIT) is True


async def test_a_work_cancelled_before_it_starts_never_runs(
    client: Any, request: pytest.FixtureRequest
) -> None:
    name = request.node.name
    client.wait_for_workers(2, timeout=WAIT)
    gate = distributed.Event(f"{name}-gate", client=client)
    busy = [client.submit(block, f"{name}-gate", pure=False) for _ in range(2)]
    work = tsfn.AsyncWork(record_run, data=name, executor=client).queue()
    assert work.cancel()
    assert not work.cancel()
    gate.set()
    await asyncio.to_thread(distributed.wait, busy, timeout=WAIT)
    with pytest.raises(asyncio.CancelledError):
        await work
    assert work.status is tsfn.Status.CANCELLED
    # Every job queued behind the blockers has run by now; the work was not one.
    await asyncio.to_thread(client.submit(block, f"{name}-gate", pure=False).result, WAIT)
    assert not distributed.Event(name, client=client).is_set()


async def test_a_work_returns_its_value(executor: Any) -> None:
    assert await tsfn.AsyncWork(len, data="four", executor=executor) == 4


async def test_a_dead_worker_ends_the_stream_with_killed_worker_after_its_items(
    client: Any, request: pytest.FixtureRequest
) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    name = request.node.name
    arrived = distributed.Event(name, client=client)
    got: list[int] = []
    with pytest.raises(distributed.scheduler.KilledWorker):
        await read_all(tsfn.stream(die, name, executor=client), got, arrived.set)
    assert got == [0, 1, 2]
