"""Channels to worker processes: frames, authentication, and the hub that listens.

A job sent to another process (a process pool's worker, a Dask worker) connects back
over TCP to the process whose loop waits for it; that connection is the job's
channel: items and the outcome one way, credits and cancellation the other. A frame
is a header (`!IB`: payload length, kind) and a payload.

Security. Unpickling runs code, so nothing from a connection is unpickled before it
has authenticated. Each job gets a `Ticket`: a random id and a random 32-byte token
(`secrets`), which reach the worker inside the job, through the executor's own
channel. A connection's first frame must be HELLO and exactly id + token long, and
the token is compared with `hmac.compare_digest`. Anything else (a wrong token, an
unknown id, garbage, a truncated or oversized first frame, silence for
`AUTH_TIMEOUT` seconds) is closed at once and logged on the ``tsfn`` logger. A ticket
lets one connection in, once. The hub listens on one interface (loopback for local
pools) and only while some job holds a ticket (and `LINGER` seconds more). The token authenticates; it does not
encrypt: across a network, the frames travel in the clear.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hmac
import logging
import os
import secrets
import select
import selectors
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from ._errors import TsfnError

__all__ = [
    "AUTH_TIMEOUT",
    "CANCEL",
    "CREDIT",
    "ERROR",
    "HELLO",
    "ITEMS",
    "MAX_FRAME",
    "RESULT",
    "START",
    "Channel",
    "ChannelError",
    "Hub",
    "Ticket",
    "connect",
]

# Frame kinds.
HELLO, START, ITEMS, RESULT, ERROR, CREDIT, CANCEL = range(7)

_HEADER = struct.Struct("!IB")
_ID_BYTES = 16
_TOKEN_BYTES = 32
HELLO_BYTES = _ID_BYTES + _TOKEN_BYTES

# The largest payload a trusted peer may announce: a sanity bound (an item larger
# than half of it is refused where it is emitted), not a security one; before
# authentication the only acceptable length is HELLO_BYTES.
MAX_FRAME = 1 << 30

# How long a hub with no ticket out stays open for the next one: opening a hub (a
# socket and a thread) costs about as much as a small job on a pool.
LINGER = 1.0

# How many ended tickets a hub remembers (see Hub._spent).
_SPENT = 1024

# How long a new connection may take to say HELLO. Connections are authenticated one
# after the other, so a silent one delays the others by at most this much.
AUTH_TIMEOUT = 5.0

_log = logging.getLogger("tsfn")


class ChannelError(TsfnError):
    """A connection or frame a channel refuses: cut short, oversized, unexpected."""


class _Frames:
    """Splits a byte stream into frames, refusing a length over `limit`."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, bytes]] = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            length, kind = _HEADER.unpack_from(buffer, start)
            if length > self._limit:
                raise ChannelError(
                    f"a frame announced {length} bytes, more than the {self._limit} allowed"
                )
            end = start + _HEADER.size + length
            if end > len(buffer):
                break
            frames.append((kind, bytes(buffer[start + _HEADER.size : end])))
            start = end
        del buffer[:start]
        return frames

    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buffer)


class Channel:
    """One authenticated connection: `send` from any thread; `recv` and `read_now`
    on one thread at a time.

    Sends are serialised by a lock and never raise once the channel is closed
    (`tell`); `close` is idempotent. Whoever reads keeps reading until the peer's end
    of stream, so that neither side closes with unread bytes (which would make the
    kernel reset the connection and drop what the other side had not read yet).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_frames",
        "_lock",
        "_peeker",
        "_poller",
        "_ready",
        "sock",
    )

    def __init__(self, sock: socket.socket, frames: _Frames | None = None) -> None:
        self.sock = sock
        _open_channels.add(self)
        self._lock = threading.Lock()
        self._closed = False
        self._frames = frames or _Frames(MAX_FRAME)
        self._ready: deque[tuple[int, bytes]] = deque()
        # select.poll objects, made when first used. Two: poll objects must not be
        # shared between threads, and a worker's receiver waits while its emitter
        # reads what came.
        self._poller: Any = None  # wait_readable's
        self._peeker: Any = None  # read_now's

    def send(self, kind: int, payload: bytes = b"") -> None:
        """Send one frame; raises OSError if the connection is broken or closed."""
        header = _HEADER.pack(len(payload), kind)
        with self._lock:
            if self._closed:
                raise OSError(f"the channel is closed; cannot send a frame of kind {kind}")
            if len(payload) < 1 << 16:
                self.sock.sendall(header + payload)  # one write: small frames dominate
            else:
                self.sock.sendall(header)
                self.sock.sendall(payload)

    def tell(self, kind: int, payload: bytes = b"") -> bool:
        """`send`, reporting a broken or closed channel as False instead of raising."""
        try:
            self.send(kind, payload)
        except OSError:
            return False
        return True

    def recv(self) -> tuple[int, bytes] | None:
        """The next frame, waiting for it; None at the peer's end of stream, or once
        the connection failed (reset, timed out). Raises ChannelError on a frame cut
        short or oversized."""
        while not self._ready:
            if not self._fill(wait=True):
                return None
        return self._ready.popleft()

    def read_now(self) -> list[tuple[int, bytes]] | None:
        """The frames that have arrived, without waiting (maybe none); None at the
        peer's end of stream (or a failed connection). Raises ChannelError as `recv`
        does."""
        if not self._ready and not self._fill(wait=False):
            return None
        frames = list(self._ready)
        self._ready.clear()
        return frames

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for something to read (a frame, or the end of
        stream); True if there is. Reads nothing."""
        if self._ready:
            return True
        # One poll object for the channel's life, not a selector per wait (an epoll fd
        # made and closed each time cost more than the frame).
        if self._poller is None:
            self._poller = self._poll_object()
        return self._poll(self._poller, timeout)

    def _poll_object(self) -> Any:
        if not hasattr(select, "poll"):
            return None
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return poller

    def _poll(self, poller: Any, timeout: float) -> bool:
        if poller is None:  # Windows: no poll, and a select with no fd-number limit
            return bool(select.select([self.sock], [], [], timeout)[0])
        return bool(poller.poll(timeout * 1000))

    def _fill(self, *, wait: bool) -> bool:
        """Read once, waiting for something only if `wait`; False at the end of stream."""
        if not wait:
            # Looked first: a recv with MSG_DONTWAIT that finds nothing costs three
            # times as much, in the exception it raises. (Not a non-blocking socket:
            # the senders block.)
            if self._peeker is None:
                self._peeker = self._poll_object()
            if not self._poll(self._peeker, 0):
                return True
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            raise  # not the peer's doing: a socket left non-blocking, a bug to see
        except OSError:
            # Reset (the peer's process died), timed out, unreachable: the peer is
            # gone, as at its end of stream. The job's outcome then says why.
            data = b""
        if not data:
            if self._frames.pending():
                raise ChannelError(
                    f"the connection closed in the middle of a frame "
                    f"({self._frames.pending()} bytes of it arrived)"
                )
            return False
        self._ready.extend(self._frames.feed(data))
        return True

    def end(self) -> None:
        """Tell the peer nothing more will be sent (it reads an end of stream)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # the peer has gone already
                    self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.sock.close()


def connect(address: tuple[str, int], hello: bytes) -> Channel:
    """In the worker: connect to the hub at `address` and present the ticket."""
    sock = socket.create_connection(address, timeout=AUTH_TIMEOUT)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    channel = Channel(sock)
    channel.send(HELLO, hello)
    return channel


class _State(enum.Enum):
    PENDING = "pending"  # its job may connect
    CONNECTED = "connected"  # its job did; nobody else may
    REVOKED = "revoked"  # its job was cancelled first: a late connection is turned away
    DONE = "done"  # its job has ended


class Ticket:
    """One job's right to connect once. `hello` travels inside the job (with the
    hub's `address`); `on_connect(channel)` runs on the hub's thread when it does,
    and must not block."""

    __slots__ = ("_hub", "_on_connect", "_state", "_token", "address", "hello", "id")

    def __init__(self, hub: Hub, on_connect: Callable[[Channel], None]) -> None:
        self._hub = hub
        self.id = secrets.token_bytes(_ID_BYTES)
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        self.hello = self.id + self._token
        self.address = hub.address
        self._on_connect = on_connect
        self._state = _State.PENDING

    def revoke(self) -> bool:
        """Turn the job away if it has not connected yet; True if so."""
        with Hub._lock:
            if self._state is not _State.PENDING:
                return False
            self._state = _State.REVOKED
            return True

    def done(self) -> bool:
        """The job has ended: drop the ticket. True if it never connected."""
        with Hub._lock:
            connected = self._state is _State.CONNECTED
            self._state = _State.DONE
            self._hub._drop(self)
            return not connected


class Hub:
    """One listening socket per interface while tickets are out, and its thread.

    The thread accepts and authenticates connections and hands each to its ticket;
    it reads nothing after HELLO. When no ticket has been out for LINGER seconds, the
    hub closes its socket and its thread ends; the next ticket opens a new hub.
    """

    _hubs: ClassVar[dict[str, Hub]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()  # guards every hub and ticket

    def __init__(self, host: str) -> None:
        self._host = host
        self._listener = socket.create_server((host, 0), backlog=64)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._tickets: dict[bytes, Ticket] = {}
        # Tickets whose job has ended: a connection presenting one is closed quietly,
        # not reported (a job that does not wait for START may end before its
        # connection is read; Dask may run a job again).
        self._spent: collections.OrderedDict[bytes, Ticket] = collections.OrderedDict()
        self._thread = threading.Thread(target=self._serve, name="tsfn-hub", daemon=True)
        self._thread.start()

    @classmethod
    def ticket(cls, host: str, on_connect: Callable[[Channel], None]) -> Ticket:
        """A new ticket to the hub listening on `host` (started if none is)."""
        with cls._lock:
            hub = cls._hubs.get(host)
            if hub is None:
                hub = cls._hubs[host] = cls(host)
            ticket = Ticket(hub, on_connect)
            hub._tickets[ticket.id] = ticket
            return ticket

    def _drop(self, ticket: Ticket) -> None:
        # Under Hub._lock.
        if self._tickets.pop(ticket.id, None) is None:
            return
        self._spent[ticket.id] = ticket
        if len(self._spent) > _SPENT:
            self._spent.popitem(last=False)
        if not self._tickets:
            self._wake_w.send(b"x")  # the thread starts lingering

    def _serve(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                timeout: float | None = None
                while True:
                    ready = {key.fileobj for key, _ in selector.select(timeout)}
                    if self._listener in ready:
                        self._admit()
                    if self._wake_r in ready:
                        self._wake_r.recv(64)
                    with Hub._lock:
                        if self._tickets:
                            timeout = None
                        elif ready:
                            timeout = LINGER
                        else:
                            # Stop listening first: a hub no longer listed refuses
                            # connections. The next ticket opens a new hub.
                            self._listener.close()
                            del self._hubs[self._host]
                            return
        finally:
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _admit(self) -> None:
        try:
            sock, peer = self._listener.accept()
        except OSError:
            return  # the peer gave up before we got to it
        try:
            ticket = self._authenticate(sock)
        except (ChannelError, OSError) as exc:
            _log.warning("tsfn refused a connection from %s: %s", peer, exc)
            sock.close()
            return
        with Hub._lock:
            admitted = ticket._state is _State.PENDING and ticket.id in self._tickets
            if admitted:
                ticket._state = _State.CONNECTED
        if not admitted:
            # A cancelled job, a second run of one (a retry), or one that has ended:
            # its worker reads an end of stream instead of START, and does not run.
            sock.close()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ticket._on_connect(Channel(sock))

    def _authenticate(self, sock: socket.socket) -> Ticket:
        """The ticket `sock` presents, read within AUTH_TIMEOUT; ChannelError if none."""
        deadline = time.monotonic() + AUTH_TIMEOUT  # for the whole hello, not each byte
        frames = _Frames(HELLO_BYTES)
        got: list[tuple[int, bytes]] = []
        while not got:
            left = deadline - time.monotonic()
            try:
                if left <= 0:  # (a timeout of 0 would make the socket non-blocking)
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(HELLO_BYTES + _HEADER.size)
            except TimeoutError:
                raise ChannelError(f"no hello within {AUTH_TIMEOUT} s") from None
            if not data:
                raise ChannelError(
                    f"the connection closed before its hello was complete "
                    f"({frames.pending()} bytes of it arrived)"
                )
            got = frames.feed(data)
        kind, payload = got[0]
        if kind != HELLO or len(payload) != HELLO_BYTES:
            raise ChannelError(
                f"the first frame must be a hello of {HELLO_BYTES} bytes, "
                f"got kind {kind} of {len(payload)} bytes"
            )
        with Hub._lock:
            ticket = self._tickets.get(payload[:_ID_BYTES]) or self._spent.pop(
                payload[:_ID_BYTES], None
            )
        # Compared in constant time even when the id is unknown, so that timing tells
        # nothing about the token.
        expected = ticket._token if ticket is not None else bytes(_TOKEN_BYTES)
        if not hmac.compare_digest(payload[_ID_BYTES:], expected) or ticket is None:
            raise ChannelError("wrong ticket (unknown id or wrong token)")
        return ticket


_open_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def _close_inherited() -> None:
    """In a forked child (a fork-context pool's worker): close the copies of every
    hub's and channel's socket, so that they close when their owner closes them.

    No lock is taken: another thread may have held one at the fork, and no other
    thread exists here.
    """
    Hub._lock = threading.Lock()
    for hub in list(Hub._hubs.values()):
        for sock in (hub._listener, hub._wake_r, hub._wake_w):
            sock.close()
    Hub._hubs.clear()
    for channel in list(_open_channels):
        channel.sock.close()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_close_inherited)
