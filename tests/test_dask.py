"""`stream` and `AsyncWork` on a real Dask cluster: a `distributed.LocalCluster` of two
worker processes, started once for the module, reached through a `Client` and through
its `get_executor()`. The workers reach this process's hub over loopback TCP.

The cluster is made with ``allowed-failures: 0``: a task whose worker dies fails with
`KilledWorker` at once instead of being run again elsewhere (a stream cannot be
replayed: a second run is turned away, see docs/howto/dask.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from _helpers import WAIT, read_all, remote_threads, return_with_a_consumer_running, wait_until

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
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 0,
                # Dask's profiler reads the frames of the workers' running threads,
                # which crashes a free-threaded CPython (python/cpython#152355).
                "distributed.worker.profile.enabled": False,
            }
        ),
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


def counted(emit: Emit, n: int, name: str) -> None:
    """Records in a Dask Variable, before each emit, how many items it has tried."""
    attempted = distributed.Variable(name)
    for i in range(n):
        attempted.set(i + 1)
        emit(i)


def dask_ports(client: Any) -> set[int]:
    """The ports Dask listens on: its scheduler's, its workers' and their nannies'."""
    workers = client.scheduler_info()["workers"]
    addresses = [client.scheduler.address, *workers]
    addresses += [worker["nanny"] for worker in workers.values() if worker.get("nanny")]
    return {int(address.rpartition(":")[2]) for address in addresses}


def sockets(daskports: set[int]) -> int:
    """How many sockets this process holds, less those on Dask's ports (its connection
    pools open and close them as they please): tsfn's are among the rest. By fd, so
    that a socket closed but for its fd (in no connection table) counts too."""
    dasks = {
        c.fd
        for c in psutil.Process().net_connections(kind="inet")
        if daskports & {c.laddr.port, getattr(c.raddr, "port", None)}
    }
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) in dasks:
            continue
        with contextlib.suppress(OSError):  # listdir's own fd, closed by now
            held += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return held


def wait_sockets(daskports: set[int], limit: int) -> int:
    """`sockets`, once at most `limit` (receiver threads end late; a connection Dask
    opens while they are counted counts once) or WAIT has passed."""
    deadline = time.monotonic() + WAIT
    while (held := sockets(daskports)) > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return held


def wait_worker_sockets(daskports: set[int], limits: dict[str, int], dask_worker: Any) -> int:
    return wait_sockets(daskports, limits[dask_worker.address])


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


# -- backpressure ----------------------------------------------------------------------


@pytest.mark.parametrize("max_queue_size", [1, 5, 64])
async def test_the_worker_is_never_more_than_max_queue_size_plus_one_ahead(
    executor: Any, client: Any, max_queue_size: int, request: pytest.FixtureRequest
) -> None:
    """As in tests/test_process.py: the worker records each item it is about to emit,
    the consumer checks after each read how many it holds in all, and at chosen points
    stalls until the worker is at the bound (within the credits' granularity)."""
    bound = max_queue_size + 1
    n = 3 * bound + 20
    attempted = distributed.Variable(request.node.name, client=client)

    def at_least(value: int) -> bool:
        return bool(attempted.get(timeout=WAIT) >= value)

    consumed = 0
    async with tsfn.stream(
        counted, n, request.node.name, executor=executor, max_queue_size=max_queue_size
    ) as items:
        async for item in items:
            assert item == consumed
            consumed += 1
            assert await asyncio.to_thread(attempted.get, timeout=WAIT) - consumed <= bound
            if consumed in (1, n // 2):
                near = consumed + bound - (max(1, max_queue_size // 4) - 1)
                await asyncio.to_thread(wait_until, functools.partial(at_least, near))
    assert consumed == n


# -- cancellation and shutdown ---------------------------------------------------------


async def test_cancelling_the_consumer_task_stops_the_dask_worker_first(
    executor: Any, client: Any, request: pytest.FixtureRequest
) -> None:
    name = request.node.name
    first = asyncio.Event()

    async def consume() -> None:
        async with tsfn.stream(endless, name, executor=executor, max_queue_size=4) as items:
            async for _ in items:
                first.set()

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(first.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert distributed.Variable(name, client=client).get(timeout=WAIT) is True


def test_loop_shutdown_with_a_dask_stream_running_tells_the_worker(
    client: Any, request: pytest.FixtureRequest
) -> None:
    """A consumer task left running when main returns is cancelled by asyncio.run's
    shutdown, which tells the Dask worker."""
    client.wait_for_workers(2, timeout=WAIT)
    name = request.node.name
    return_with_a_consumer_running(tsfn.stream(endless, name, executor=client))
    assert distributed.Variable(name, client=client).get(timeout=WAIT) is True


# -- no leaks --------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc/self/fd")
async def test_many_streams_leak_no_socket_or_thread_here_or_on_the_workers(client: Any) -> None:
    client.wait_for_workers(2, timeout=WAIT)
    daskports = dask_ports(client)

    async def streams(count: int, n: int) -> None:
        for _ in range(count):
            async with tsfn.stream(count_to, n, executor=client) as items:
                async for _ in items:
                    pass

    await streams(4, 10)  # both workers have connected to this process by now
    await asyncio.to_thread(wait_until, lambda: not remote_threads())
    before = sockets(daskports)
    workers_before = await asyncio.to_thread(client.run, sockets, daskports)
    await streams(40, 100)
    async with tsfn.stream(count_to, 10**9, executor=client) as items:
        async for _ in items:
            break  # and one left early
    await asyncio.to_thread(wait_until, lambda: not remote_threads())
    # Fewer is fine: the hub's listener has closed.
    assert await asyncio.to_thread(wait_sockets, daskports, before) <= before
    after = await asyncio.to_thread(client.run, wait_worker_sockets, daskports, workers_before)
    grown = {w: n - workers_before[w] for w, n in after.items() if n > workers_before[w]}
    assert grown == {}
