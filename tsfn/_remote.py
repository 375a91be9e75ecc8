"""The worker process's end of a channel: what a job sent to another process runs.

`serve_stream` runs a stream's function there, `serve_work` an AsyncWork's
`execute`. Both first connect to the loop's process, present their ticket, and wait
for START: a job whose consumer is gone (a cancelled work, a retry of a stream) reads
an end of stream instead and does not run. Then what the loop side sends is read:
CANCEL sets the job's `CancelFlag` (so `tsfn.cancelled()`, the token's `wait()` and
its hooks work as in-process) and makes `emit` raise `Closing`; CREDIT lets `emit`
send more. The loop side's end of stream counts as CANCEL: its process has gone, or
the job is over. A *receiver* thread reads, except while a stream's `emit` is busy:
then `emit` reads for itself, at each batch it sends and while it waits for credits,
so that a credit costs no switch between threads (see `_Sender.listen`).

`emit` pickles each item at once (an item that does not pickle raises in the `emit`
that was given it), batches them, and sends a batch inline, in the thread that calls
`emit`, when it is full or when the credits run out. A sender thread would wait for
the GIL up to the interpreter's switch interval for each batch. The receiver sends a
batch whose first item has waited FLUSH_AGE seconds (the function emits slowly, or
computes without emitting).

Credits keep the bound exact: the loop side gives `max_queue_size` at the start and
one back per item its consumer has read, so items emitted and not yet read, wherever
they are (this batch, the sockets, the loop side's queue), never exceed
`max_queue_size`, and the function, blocked in `emit` with one more item in hand, is
at most `max_queue_size + 1` ahead. `latest=True` works with one credit: an item
emitted while the one before is unread waits in a slot, overwritten by newer ones,
and the receiver sends it when the consumer reads; the last one is always sent.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from ._cancel import CancelFlag, run_with_flag
from ._channel import (
    CANCEL,
    CREDIT,
    ERROR,
    ITEMS,
    MAX_FRAME,
    RESULT,
    START,
    Channel,
    connect,
)
from ._errors import Closing, TsfnError

__all__ = ["describe", "serve_stream", "serve_work"]

R = TypeVar("R")

# A batch is sent when its first item has waited this long (a guess: well under what
# a person notices, well over a send's cost; see benchmarks/)...
FLUSH_AGE = 0.002
# ...or when it holds this many items or bytes.
FLUSH_ITEMS = 256
FLUSH_BYTES = 1 << 20


class _Link:
    """A job's channel in the worker: connection, cancel flag, receiver thread.

    The socket is closed by whichever finishes last of the job and the receiver, so
    that neither uses a closed socket and the receiver reads until the loop side's
    end of stream (see `Channel`).
    """

    def __init__(self, address: tuple[str, int], hello: bytes, *, lazy: bool = False) -> None:
        self._address = address
        self._hello = hello
        self.flag = _LazyFlag(self) if lazy else CancelFlag()
        self.channel: Channel | None = None
        self._lock = threading.Lock()
        self._users = 0
        self._opened = False

    def open_once(self) -> None:
        """Connect, without waiting for START, unless done already. Any thread.

        If this process cannot reach the loop's any more, the work's result is not
        wanted either: the flag is set.
        """
        if self._opened:
            return
        with self._lock:
            if self._opened:
                return
            self._opened = True  # first: the receiver's own flag.set() must not recurse
        try:
            self.start(wait=False)
        except TsfnError:
            self.flag.set()

    def start(self, sender: _Sender | None = None, *, wait: bool = True) -> bool:
        """Connect, then wait to be let in: True once START came (then listen).

        Without `wait`, listen at once and return True (the receiver skips START):
        for a job whose executor's own future tells whether it started.
        """
        try:
            channel = connect(self._address, self._hello)
        except OSError as exc:
            raise TsfnError(
                f"cannot reach the loop's process at {self._address[0]}:{self._address[1]} "
                f"({exc}); the workers must be able to connect to it"
            ) from exc
        frame = channel.recv() if wait else (START, b"")
        if frame is None or frame[0] != START:
            channel.close()
            return False
        self.channel = channel
        self._users = 2
        if sender is not None:
            sender.channel = channel
        threading.Thread(
            target=self._receive, args=(channel, sender), name="tsfn-receiver", daemon=True
        ).start()
        return True

    def _receive(self, channel: Channel, sender: _Sender | None) -> None:
        try:
            if sender is not None:
                sender.listen()
            else:
                while (frame := channel.recv()) is not None:
                    if frame[0] == CANCEL:
                        self.flag.set()
        except OSError:
            pass  # the connection broke: as an end of stream
        finally:
            self._cancel(sender)
            self._release()

    def _cancel(self, sender: _Sender | None) -> None:
        if sender is not None:
            sender.close()
        self.flag.set()

    def finish(self) -> None:
        """The job is through: nothing more to send; close unless the receiver reads on."""
        if self.channel is not None:
            self.channel.end()
            self._release()

    def _release(self) -> None:
        assert self.channel is not None
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.channel.close()


_IS_SET = CancelFlag.__dict__["is_set"]  # the slot's descriptor


class _LazyFlag(CancelFlag):
    """A work's flag that connects its channel the first time anyone looks at it.

    A work that never asks `tsfn.cancelled()` (nor waits, nor hooks) then costs no
    connection at all; one that asks is connected from then on, and sees a
    cancellation made before it asked once CANCEL has arrived, a moment later.
    """

    __slots__ = ("_link",)

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self._link = link

    @property
    def is_set(self) -> bool:
        self._link.open_once()
        value: bool = _IS_SET.__get__(self)
        return value

    @is_set.setter
    def is_set(self, value: bool) -> None:
        _IS_SET.__set__(self, value)


class _Sender:
    """`emit` in the worker: batches, credits, the `latest` slot (see the module doc)."""

    def __init__(self, max_queue_size: int, latest: bool, flag: CancelFlag) -> None:
        self.channel: Channel | None = None  # set once connected, before the function runs
        self._flag = flag
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the receiver waits on it
        self._latest = latest
        # Unbounded: credits that never run out. A batch is a quarter of the queue
        # (see _relay.py's credits).
        self._credits = 1 if latest else (max_queue_size or sys.maxsize)
        self._flush_at = (
            FLUSH_ITEMS
            if latest or not max_queue_size
            else min(FLUSH_ITEMS, max(1, max_queue_size // 4))
        )
        self._batch: list[bytes] = []  # each item's pickle
        self._bytes = 0
        self._since = 0.0  # when the batch's first item came
        self._slot: bytes | None = None
        self._closing = False
        self._finished = False  # the function has returned: the receiver reads to the end
        # Counted, not timed, per item: the receiver tells from it whether emit is
        # busy (see listen). A clock read per item cost a tenth of emit.
        self._emitted = 0
        self.emit: Callable[[Any], None] = self._offer if latest else self._put

    def _put(self, item: Any) -> None:
        data = _dump(item)
        with self._lock:
            if not self._credits and not self._closing:
                self._flush()
                self._wait_for_credits()
            closing = self._closing
            if not closing:
                batch = self._batch
                if not batch:
                    self._since = time.monotonic()
                batch.append(data)
                self._emitted += 1
                self._credits -= 1
                self._bytes += len(data)
                if len(batch) >= self._flush_at or not self._credits or self._bytes >= FLUSH_BYTES:
                    self._flush()
        if closing:
            self._refuse()

    def _wait_for_credits(self) -> None:
        # Under the lock, which keeps the receiver away meanwhile. The emitter reads
        # the credits itself: through the receiver thread, each would cost two thread
        # switches (one stream through a pool, bounded 64: about 1.2x the items/s).
        while self._credits == 0 and not self._closing:
            assert self.channel is not None
            frame = self.channel.recv()
            self._take(None if frame is None else [frame])

    def _offer(self, item: Any) -> None:
        data = _dump(item)
        with self._lock:
            closing = self._closing
            if closing:
                pass
            elif self._credits:
                self._credits = 0
                self._send_items([data])
            else:
                self._slot = data
        if closing:
            self._refuse()

    def _refuse(self) -> NoReturn:
        # Outside the lock: setting the flag runs the token's hooks.
        self._flag.set()
        raise Closing("the stream's consumer has gone")

    def listen(self) -> None:
        """On the receiver thread: read the loop side's frames until its end of stream.

        While `emit` is busy (it was called within the last FLUSH_AGE, or waits for
        credits, under the lock), it reads them itself, and the receiver stays away
        from the socket: a thread woken for each credit frame would take the GIL from
        the emitter. Meanwhile the receiver only sends a batch whose first item has
        waited FLUSH_AGE (emit does not read the clock for each item). Otherwise the
        receiver reads, so that CANCEL reaches the flag while the function computes
        without emitting. With `latest`, the receiver always reads: a credit sends
        the slot.
        """
        channel = self.channel
        assert channel is not None
        seen = -1  # emit's count when the receiver last looked
        while True:
            with self._lock:
                due = self._flush_aged()
                if self._busy(seen):
                    seen = self._emitted
                    self._cond.wait(due)
                    continue
            if not channel.wait_readable(FLUSH_AGE):
                continue
            with self._lock:
                frames = channel.read_now()
                self._take(frames)
                closing = self._closing
            if closing:
                self._flag.set()
            if frames is None:
                return

    def _flush_aged(self) -> float:
        # Under the lock: send the batch if it has waited FLUSH_AGE; how long until
        # the next one is due.
        if self._batch:
            due = self._since + FLUSH_AGE - time.monotonic()
            if due > 0:
                return due
            self._flush()
        return FLUSH_AGE

    def _busy(self, seen: int) -> bool:
        # Under the lock: whether the receiver stays away from the socket.
        if self._latest or self._closing or self._finished:
            return False
        return self._emitted != seen or bool(self._batch)

    def _take(self, frames: list[tuple[int, bytes]] | None) -> None:
        # Under the lock: what the loop side sent (None: its end of stream).
        if frames is None:
            self._closing = True
            return
        for kind, payload in frames:
            if kind == CREDIT:
                self._credit(int.from_bytes(payload, "big"))
            elif kind == CANCEL:
                self._closing = True

    def _credit(self, count: int) -> None:
        # Under the lock: the consumer has read `count` more items.
        if not self._latest:
            self._credits += count
        elif self._slot is not None:
            slot, self._slot = self._slot, None
            self._send_items([slot])
        else:
            self._credits = 1

    def close(self) -> None:
        """The consumer has gone: every later `emit` raises Closing."""
        with self._lock:
            self._closing = True

    def finish(self, kind: int, payload: bytes) -> None:
        """The function has returned (RESULT) or raised (ERROR): send what is left."""
        with self._lock:
            self._flush()
            if self._slot is not None:
                slot, self._slot = self._slot, None
                self._send_items([slot])
            self._send(kind, payload)
            self._finished = True
            self._cond.notify()  # the receiver reads on to the end

    def _flush(self) -> None:
        # Under the lock. What has arrived is read first: credits, or a CANCEL.
        assert self.channel is not None
        self._take(self.channel.read_now())
        if self._batch:
            batch, self._batch = self._batch, []
            self._bytes = 0
            self._send_items(batch)

    def _send_items(self, pickles: list[bytes]) -> None:
        # Under the lock. An ITEMS frame is the list of its items' pickles, pickled:
        # the loop side splits it in one call (see _relay.py's _unpickle_into).
        self._send(ITEMS, pickle.dumps(pickles, pickle.HIGHEST_PROTOCOL))

    def _send(self, kind: int, payload: bytes) -> None:
        # Under the lock. A broken connection means the loop side has gone.
        assert self.channel is not None
        if not self.channel.tell(kind, payload):
            self._closing = True


def _dump(item: Any) -> bytes:
    data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_FRAME // 2:
        raise ValueError(
            f"an emitted item pickles to {len(data)} bytes, more than a channel's "
            f"frame takes ({MAX_FRAME // 2}); emit smaller items"
        )
    return data


def describe(exc: BaseException) -> bytes:
    """An ERROR frame's payload: the exception pickled if it pickles, and its text.

    The outer pickle holds only strings and bytes, so the loop side can always read
    it, and the traceback text, even when the exception's own class does not load.
    """
    where = f"process {os.getpid()} on {socket.gethostname()}"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    summary = f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    try:
        pickled: bytes | None = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pickled = None
    return pickle.dumps((summary, f"Remote traceback ({where}):\n{text}", pickled))


def serve_stream(
    address: tuple[str, int],
    hello: bytes,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    max_queue_size: int,
    latest: bool,
) -> None:
    """In the worker: run ``func(emit, *args)``, sending items and outcome back."""
    link = _Link(address, hello)
    sender = _Sender(max_queue_size, latest, link.flag)
    if not link.start(sender):
        raise TsfnError(
            "this stream's consumer is not waiting for this job: a stream runs once "
            "(was it retried after its worker died?)"
        )
    try:
        try:
            result = run_with_flag(link.flag, functools.partial(func, sender.emit, *args))
        except BaseException as exc:  # re-raised in the consumer, after the items
            sender.finish(ERROR, describe(exc))
        else:
            try:
                payload = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                sender.finish(ERROR, describe(exc))
            else:
                sender.finish(RESULT, payload)
    finally:
        link.finish()


def serve_work(
    address: tuple[str, int],
    hello: bytes,
    gated: bool,
    job: Callable[[Callable[[], bool] | None, CancelFlag, Callable[[Any], R], Any], R],
    execute: Callable[[Any], R],
    data: Any,
) -> R:
    """In the worker: ``job(start, flag, execute, data)``, `flag` set by the channel.

    `job` is AsyncWork's own (it runs `execute` unless `start()` says the work was
    cancelled first); its outcome travels back through the executor, as without a
    channel. `gated`: connect and wait for START first, as the executor's future
    cannot be trusted to say whether the job started (Dask's); otherwise run at once
    and connect only if the work looks at its cancellation (`_LazyFlag`).
    """
    link = _Link(address, hello, lazy=not gated)
    try:
        return job(link.start if gated else None, link.flag, execute, data)
    finally:
        link.finish()
