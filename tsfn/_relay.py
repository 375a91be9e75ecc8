"""The loop process's end of a job that runs in another process (a pool, Dask).

`remote_executor` tells which executors run their jobs in other processes: process
pools, and a Dask `distributed.Client` or its `get_executor()`. For them, a job is
sent with a `Ticket` of the `Hub` listening where the workers can reach this process
(loopback for a local pool; for Dask, the interface this process reaches the
scheduler through), and its channel carries what a thread pool's job would reach
through shared memory.

A remote stream's items are read on the loop thread, through the `Port`
(`RemoteStream`), and credits go back from the consumer's side as it reads; a *relay*
thread ends the stream and reads only where the loop cannot. A remote AsyncWork's
channel carries only START and CANCEL; its outcome comes back through the executor's
future, as without a channel.
"""

from __future__ import annotations

import concurrent.futures
import functools
import pickle
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ._cancel import CancelFlag
from ._channel import (
    CANCEL,
    CREDIT,
    ERROR,
    ITEMS,
    RESULT,
    START,
    Channel,
    ChannelError,
    Hub,
    Ticket,
)
from ._loop import Port
from ._remote import serve_stream, serve_work

__all__ = ["DaskClient", "RemoteStream", "RemoteWork", "executor_of"]

R = TypeVar("R")

_LOOPBACK = "127.0.0.1"

# How often a stream's relay looks whether its loop was closed under it (as blocked
# callers of a ThreadsafeFunction do).
POLL = 0.1


class DaskClient(Protocol):
    """What tsfn uses of a `distributed.Client` (not imported: Dask is optional)."""

    def get_executor(self, **kwargs: Any) -> concurrent.futures.Executor:
        """A `concurrent.futures.Executor` that runs jobs on the cluster."""
        ...


def executor_of(
    executor: concurrent.futures.Executor | DaskClient | None,
) -> tuple[concurrent.futures.Executor | None, str | None]:
    """The executor to submit to, and the host its workers reach us on (None: this
    process's threads). Raises TypeError for anything else."""
    if executor is None:
        return None, None
    if _is_dask(executor) and hasattr(executor, "get_executor"):
        executor = executor.get_executor()
    if not isinstance(executor, concurrent.futures.Executor):
        raise TypeError(
            "executor must be a concurrent.futures.Executor, a distributed.Client, "
            f"or None, got {executor!r}"
        )
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        return executor, _LOOPBACK
    if _is_dask(executor):
        return executor, _host_toward(executor._client.scheduler.address)  # type: ignore[attr-defined]
    return executor, None


def _is_dask(executor: object) -> bool:
    return type(executor).__module__.partition(".")[0] == "distributed"


def _host_toward(address: str) -> str:
    """This machine's address on the interface that reaches `address` (a Dask
    scheduler's, ``tcp://host:port``): the one its workers can most likely reach too."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("tcp", "tls"):
        return _LOOPBACK  # inproc:// and the like: the workers are in this process
    host = rest.rpartition(":")[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):
        return _LOOPBACK
    # Connecting a UDP socket sends nothing; it only picks the route and its source.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        source: str = probe.getsockname()[0]
        return source


class _Job:
    """A job submitted with a ticket: its future and the channel once it connected."""

    def __init__(self, host: str) -> None:
        self._lock = threading.Lock()
        self.channel: Channel | None = None
        self.cancelled = False  # the loop side wants the job to stop
        self.ticket: Ticket = Hub.ticket(host, self._connected)
        # The executor's future, until it is done (then dropped: a Dask future that
        # is still referenced keeps its result on the cluster, and Dask would run
        # the job again if the worker holding that result died).
        self.future: concurrent.futures.Future[Any] | None = None
        self.error: BaseException | None = None  # the job's, once it is done
        self.ended = threading.Event()

    def submit(
        self, executor: concurrent.futures.Executor, func: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        try:
            future = executor.submit(func, self.ticket.address, self.ticket.hello, *args)
        except BaseException:
            self.ticket.done()
            raise
        self.future = future
        future.add_done_callback(self._done)  # which may run at once, here
        return future

    def _connected(self, channel: Channel) -> None:
        # On the hub's thread.
        with self._lock:
            channel.tell(START)
            if self.cancelled:
                channel.tell(CANCEL)
            self.channel = channel
        self.on_connect(channel)

    def on_connect(self, channel: Channel) -> None:
        """After START: a stream starts its relay."""

    def cancel(self) -> None:
        """Tell the job to stop (now, or as it connects). Any thread; idempotent."""
        with self._lock:
            self.cancelled = True
            if self.channel is not None:
                self.channel.tell(CANCEL)

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            self.error = future.exception()
        except concurrent.futures.CancelledError as exc:
            self.error = exc
        self.future = None
        self.ended.set()
        if self.ticket.done():
            self.never_connected()

    def never_connected(self) -> None:
        """The job ended without connecting (it failed to start, or was cancelled)."""

    def outcome(self) -> BaseException | None:
        """Block until the job is done; its exception, or None."""
        self.ended.wait()
        return self.error


class RemoteWork(_Job):
    """An AsyncWork's job in another process: a gate that works across processes, and
    cancellation passed on through `flag`."""

    def __init__(self, host: str, flag: CancelFlag) -> None:
        super().__init__(host)
        flag.add_hook(self.cancel)  # the loop side sets it: pass it on

    def submit_work(
        self,
        executor: concurrent.futures.Executor,
        job: Callable[..., R],
        execute: Callable[[Any], R],
        data: Any,
    ) -> concurrent.futures.Future[R]:
        self._gated = _is_dask(executor)
        return self.submit(executor, serve_work, self._gated, job, execute, data)

    def revoke(self) -> bool:
        """Cancel if the job has not started; True if so.

        A process pool's future says so truly. A Dask future says it cancelled a task
        that is running, so there the ticket decides: the job waits for START, and a
        job turned away runs nothing.
        """
        future = self.future
        if future is None:
            return False  # done already
        if not self._gated:
            return future.cancel()
        if not self.ticket.revoke():
            return False
        future.cancel()  # frees its place in the executor's queue, if it still can
        return True

    def on_connect(self, channel: Channel) -> None:
        # Closed when the job is done (`_done`); the worker reads until then.
        if self.ended.is_set():
            self._close()

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        super()._done(future)
        self._close()

    def _close(self) -> None:
        with self._lock:
            channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()


class RemoteStream(_Job):
    """A stream's job in another process, and the reading of its channel.

    The loop reads the channel itself (`Port.watch_readable`) and hands each batch of
    items to `deliver` there. A *relay* thread ends the stream: it waits for the
    loop's reading to end (the worker's end of stream, a fault, or `detach`), reads
    whatever is left, waits for the job's outcome, and runs `run(body)`, the stream's
    worker routine, with a `body` that returns the function's result or raises its
    exception. The relay reads and delivers (through the loop's callbacks) only on a
    loop that watches no sockets. Once the stream is detached, or its loop closed
    under it (a bare `loop.close()` runs no shutdown; the relay finds out within POLL
    seconds), the job is told to stop and the rest is read and dropped. Reading always
    goes on to the worker's end of stream (see `Channel`).
    """

    def __init__(
        self,
        host: str,
        port: Port,
        deliver: Callable[[list[Any]], None],
        run: Callable[[Callable[[], Any]], None],
        max_queue_size: int,
        latest: bool,
    ) -> None:
        super().__init__(host)
        self._port = port
        self._deliver = deliver
        self._run = run
        self._begun = False
        self._discarding = False  # the consumer has gone: read on, deliver nothing
        self._failure: BaseException | None = None
        self._outcome: tuple[int, bytes] | None = None  # the RESULT or ERROR frame
        self._stop_watching: Callable[[], None] | None = None  # loop thread only
        self._off_loop = threading.Event()  # the loop reads no more: the relay goes on
        self._read_to_end = False  # nothing is left to read (end of stream, or a fault)
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Credits go back in quarters of the queue, as the worker sends: a credit frame
        # per batch. (Sixteenths, tried first, kept the worker closer to the bound
        # while the consumer stalls, but cost a third of the throughput in frames:
        # 200 k items through a pool, bounded 64, interleaved runs, 123 k -> 161 k
        # items/s for one stream, 167 k -> 222 k for four.) Never a deadlock: a worker
        # waiting for credits, with all it sent read, means a whole queue's worth read
        # since the last return, more than a quarter. The price: while the consumer
        # stalls, the worker may stop up to a quarter of the queue short of the bound.
        self._owed = 0  # loop thread only
        self._credit_at = 1 if latest else max(1, max_queue_size // 4)
        self.credited = latest or max_queue_size > 0  # unbounded queued: no credits

    def start(
        self,
        executor: concurrent.futures.Executor,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        max_queue_size: int,
        latest: bool,
    ) -> concurrent.futures.Future[None]:
        """Submit the job; the future is done once the relay has ended the stream."""
        self.submit(executor, serve_stream, func, args, max_queue_size, latest)
        return self.finished

    def credit_one(self) -> None:
        """The consumer has read one item (loop thread): give the credits back, in
        quarters of the queue. Only for a stream with credits (`credited`)."""
        self._owed += 1
        if self._owed >= self._credit_at:
            owed, self._owed = self._owed, 0
            channel = self.channel
            if channel is not None:
                # A write that fails (the worker died) is ignored: the reader still
                # reads every frame that arrived before.
                channel.tell(CREDIT, owed.to_bytes(4, "big"))

    def detach(self) -> None:
        """The stream has ended or was aborted: stop the job; the rest of what it
        sends is read off the loop, and dropped. Loop thread."""
        self._abandon()
        self._leave_loop()

    def on_connect(self, channel: Channel) -> None:
        self._begin()
        try:
            self._port.call_soon_threadsafe(self._watch)
        except RuntimeError:  # the loop has closed: the relay reads
            self._off_loop.set()

    def never_connected(self) -> None:
        self._begin()

    def _begin(self) -> None:
        with self._lock:
            if self._begun:
                return
            self._begun = True
        threading.Thread(target=self._relay_thread, name="tsfn-relay", daemon=True).start()

    # -- on the loop thread ------------------------------------------------------------

    def _watch(self) -> None:
        channel = self.channel
        if channel is not None and not self._discarding:
            self._stop_watching = self._port.watch_readable(channel.sock, self._readable)
        if self._stop_watching is None:
            self._off_loop.set()

    def pull(self) -> bool:
        """Read what has arrived now, if the loop reads this stream: whether anything
        had. For a consumer that found nothing to read: when the worker keeps up, the
        next batch is often there already, and reading it costs no wake-up cycle (the
        loop's select, the consumer's waiter, a task step; a tenth of the items/s)."""
        return self._stop_watching is not None and self._readable()

    def _readable(self) -> bool:
        channel = self.channel
        assert channel is not None  # the relay drops it only once the loop stopped reading
        try:
            frames = channel.read_now()
            if frames is not None:
                self._take(frames, self._deliver)
        except ChannelError as exc:
            self._fail(exc)
            frames = None
        if frames is None:
            self._read_to_end = True
        if frames is None or self._discarding:
            self._leave_loop()
        return frames != []

    def _leave_loop(self) -> None:
        stop, self._stop_watching = self._stop_watching, None
        if stop is not None:
            stop()
        self._off_loop.set()

    # -- on the relay thread -----------------------------------------------------------

    def _relay_thread(self) -> None:
        try:
            self._run(self._relay)
        finally:
            self.finished.set_result(None)

    def _relay(self) -> Any:
        """Read what the loop did not; return or raise the function's outcome."""
        channel = self.channel
        if channel is not None:
            try:
                self._read_rest(channel)
            except ChannelError as exc:
                self._fail(exc)
            finally:
                with self._lock:
                    self.channel = None
                channel.close()
        job_error = self.outcome()  # the function has returned, or its process died
        if self._failure is not None:
            raise self._failure
        if self._outcome is None:
            raise job_error or ChannelError(
                "the worker's connection closed before its function returned"
            )
        kind, payload = self._outcome
        if kind == RESULT:
            return pickle.loads(payload)
        raise _rebuild(payload)

    def _read_rest(self, channel: Channel) -> None:
        # A loop closed under the stream (a bare loop.close()) runs no shutdown, and
        # its consumer will never read again: nothing else would tell the worker, which
        # may be waiting for credits. So the relay looks every POLL seconds while it
        # waits, both for the loop's reading to end and for frames.
        while not self._off_loop.wait(POLL):
            if self._port.is_closed():
                self._abandon()
                break
        if self._read_to_end:
            return
        while True:
            if not self._discarding and not channel.wait_readable(POLL):
                if self._port.is_closed():
                    self._abandon()
                continue
            frame = channel.recv()
            if frame is None:
                return
            self._take([frame], self._deliver_soon)

    def _deliver_soon(self, items: list[Any]) -> None:
        try:
            self._port.call_soon_threadsafe(functools.partial(self._deliver, items))
        except RuntimeError:  # the loop has closed: nobody will read them
            self._abandon()

    def _abandon(self) -> None:
        # Nobody will read: stop the job, drop what it still sends.
        self._discarding = True
        self.cancel()

    # -- either ------------------------------------------------------------------------

    def _take(self, frames: list[tuple[int, bytes]], give: Callable[[list[Any]], None]) -> None:
        for kind, payload in frames:
            if kind == ITEMS:
                if not self._discarding:
                    items: list[Any] = []
                    failure = None
                    try:
                        _unpickle_into(items, payload)
                    except Exception as exc:  # one that does not unpickle here: the last
                        failure = exc
                    if items:
                        give(items)
                    if failure is not None:
                        self._fail(failure)
            elif kind in (RESULT, ERROR):
                self._outcome = kind, payload
            else:
                raise ChannelError(f"a worker sent a frame of unexpected kind {kind}")

    def _fail(self, exc: BaseException) -> None:
        self._failure = self._failure or exc
        self._abandon()


def _unpickle_into(items: list[Any], payload: bytes) -> None:
    """Append the items of an ITEMS frame (the pickled list of its items' pickles) to
    `items`, in order; those before one that does not unpickle stay there.

    Both splitting the frame and the loop over its items run in C: per item, about
    half the time of a Python loop over size-prefixed pickles.
    """
    items.extend(map(pickle.loads, pickle.loads(payload)))


def _rebuild(payload: bytes) -> BaseException:
    """The exception an ERROR frame describes, with the remote traceback as a note."""
    summary, note, pickled = pickle.loads(payload)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(
            f"the stream's function raised {summary} (it could not be sent back as itself)"
        )
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # notes are only stored (the traceback module shows them from 3.11)
        vars(exc)["__notes__"] = [*getattr(exc, "__notes__", ()), note]
    return exc
