"""The channel from worker processes accepts no connection that does not authenticate.

Each case connects to a real hub with a raw socket and misbehaves: a wrong token, an
unknown id, garbage, a truncated or oversized first frame, silence, a frame of the
wrong kind, a second use of a ticket. Each must be closed at
once (the intruder reads an end of stream), reported on the ``tsfn`` logger with a
reason, and leave the hub serving: the ticket's real job is admitted afterwards. No
pickle is ever read from such a connection: nothing here sends one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import multiprocessing
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import WAIT, wait_until

import tsfn
from tsfn import _channel
from tsfn._channel import CREDIT, HELLO, START, Channel, ChannelError, Hub, Ticket

pytestmark = pytest.mark.timeout(30)

HEADER = struct.Struct("!IB")


class Admitted:
    """A ticket's `on_connect`: records the channels its job opened."""

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self.event = threading.Event()

    def __call__(self, channel: Channel) -> None:
        self.channels.append(channel)
        self.event.set()


@pytest.fixture
def ticket() -> Iterator[tuple[Ticket, Admitted]]:
    admitted = Admitted()
    ticket = Hub.ticket("127.0.0.1", admitted)
    yield ticket, admitted
    ticket.done()
    for channel in admitted.channels:
        channel.close()


def connect(ticket: Ticket) -> socket.socket:
    return socket.create_connection(ticket.address, timeout=WAIT)


def assert_closed_by_the_hub(sock: socket.socket) -> None:
    # A reset (closed with our bytes unread) is as good as an end of stream.
    with sock, contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""


def assert_still_serving(ticket: Ticket, admitted: Admitted) -> None:
    """The ticket's real job connects after the intruder, and is let in."""
    channel = _channel.connect(ticket.address, ticket.hello)
    try:
        assert admitted.event.wait(WAIT)
    finally:
        channel.close()


def hello(payload: bytes, kind: int = HELLO) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


CASES: dict[str, tuple[Callable[[Ticket], bytes], str]] = {
    "wrong token": (lambda t: hello(t.id + bytes(32)), "wrong ticket"),
    "unknown id": (lambda t: hello(bytes(16) + t.hello[16:]), "wrong ticket"),
    "garbage": (lambda t: b"GET / HTTP/1.1\r\nHost: tsfn\r\n\r\n", "more than the 48 allowed"),
    "oversized length prefix": (lambda t: HEADER.pack(2**32 - 1, HELLO), "4294967295 bytes"),
    "truncated frame": (lambda t: hello(t.hello)[:20], "closed before its hello was complete"),
    "wrong kind": (lambda t: hello(t.hello, kind=START), "must be a hello"),
    "short hello": (lambda t: hello(t.hello[:40]), "must be a hello of 48 bytes"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_misbehaving_connection_is_refused_reported_and_the_hub_serves_on(
    case: str, ticket: tuple[Ticket, Admitted], caplog: pytest.LogCaptureFixture
) -> None:
    tkt, admitted = ticket
    payload, reason = CASES[case]
    caplog.set_level(logging.WARNING, logger="tsfn")
    sock = connect(tkt)
    sock.sendall(payload(tkt))
    sock.shutdown(socket.SHUT_WR)  # a truncated frame: nothing more comes
    assert_closed_by_the_hub(sock)
    wait_until(lambda: any(reason in r.getMessage() for r in caplog.records))
    assert not admitted.channels
    assert_still_serving(tkt, admitted)


def test_a_connection_sending_its_hello_too_slowly_is_refused_after_the_auth_timeout(
    ticket: tuple[Ticket, Admitted],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timeout is for the whole hello: a byte now and then does not keep it open."""
    tkt, admitted = ticket
    monkeypatch.setattr(_channel, "AUTH_TIMEOUT", 0.3)
    caplog.set_level(logging.WARNING, logger="tsfn")
    sock = connect(tkt)
    refused = threading.Event()

    def drip() -> None:
        for byte in hello(tkt.hello):
            try:
                sock.send(bytes([byte]))
            except OSError:
                break  # the hub closed it
            if refused.wait(0.05):
                break

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        wait_until(lambda: any("no hello within" in r.getMessage() for r in caplog.records))
    finally:
        refused.set()
        dripper.join(WAIT)
        assert_closed_by_the_hub(sock)
    assert not admitted.channels
    assert_still_serving(tkt, admitted)


def test_a_silent_connection_is_refused_after_the_auth_timeout(
    ticket: tuple[Ticket, Admitted],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tkt, admitted = ticket
    monkeypatch.setattr(_channel, "AUTH_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="tsfn")
    assert_closed_by_the_hub(connect(tkt))
    assert any("no hello within 0.2 s" in r.getMessage() for r in caplog.records)
    assert_still_serving(tkt, admitted)


def test_a_ticket_lets_one_connection_in_once(ticket: tuple[Ticket, Admitted]) -> None:
    tkt, admitted = ticket
    assert_still_serving(tkt, admitted)
    again = connect(tkt)
    again.sendall(hello(tkt.hello))
    assert_closed_by_the_hub(again)  # quietly: a retried job reads no START
    assert len(admitted.channels) == 1


def test_an_oversized_frame_from_an_authenticated_peer_is_refused_without_reading_it() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(HEADER.pack(_channel.MAX_FRAME + 1, CREDIT))
        with pytest.raises(ChannelError, match=f"announced {_channel.MAX_FRAME + 1} bytes"):
            Channel(ours).recv()


def test_a_frame_cut_short_by_the_peer_is_an_error_not_an_end() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        theirs.sendall(HEADER.pack(10, CREDIT) + b"abc")
        theirs.close()
        with pytest.raises(ChannelError, match="in the middle of a frame"):
            Channel(ours).recv()


class _TimedOut(socket.socket):
    """A socket whose connection timed out (TCP keepalive, say): not a ConnectionError."""

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))


@pytest.mark.parametrize("read", ["recv", "read_now"])
def test_a_connection_that_fails_is_an_end_of_stream_not_an_error(read: str) -> None:
    # An error out of the loop's reader callback would be raised again on every
    # turn of the loop; an end of stream ends the stream with the job's own error.
    ours, theirs = socket.socketpair()
    with theirs, _TimedOut(fileno=ours.detach()) as timed_out:
        theirs.sendall(b"x")  # readable: read_now looks before it reads
        assert getattr(Channel(timed_out), read)() is None


# -- against a real stream -------------------------------------------------------------


def count_to(emit: Any, n: int) -> int:
    for i in range(n):
        emit(i)
    return n


def block(gate: Any) -> None:
    gate.wait(WAIT)


def test_an_intruder_during_a_stream_changes_nothing_and_the_listener_closes_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tsfn")
    context = multiprocessing.get_context("forkserver")
    with (
        context.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool,
    ):
        gate = manager.Event()
        busy = pool.submit(block, gate)  # the stream's job waits behind it

        async def main() -> tuple[list[int], int]:
            async with tsfn.stream(count_to, 500, executor=pool) as items:
                # The job has its ticket and has not connected: the hub listens.
                intruder = socket.create_connection(Hub._hubs["127.0.0.1"].address)
                intruder.sendall(b"\x00\x00\x00\x30\x00" + bytes(48))  # a guessed ticket
                await asyncio.to_thread(assert_closed_by_the_hub, intruder)
                gate.set()
                got = [item async for item in items]
            return got, items.result

        got, result = asyncio.run(main())
        busy.result(WAIT)
    assert (got, result) == (list(range(500)), 500)
    assert any("wrong ticket" in r.getMessage() for r in caplog.records)
    address = None
    for hub in list(Hub._hubs.values()):
        address = hub.address
    wait_until(lambda: "127.0.0.1" not in Hub._hubs)  # no ticket out: it closed
    if address is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=WAIT).close()
