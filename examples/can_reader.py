"""Read a CAN bus with python-can's Notifier; each frame reaches the event loop, in order.

    python examples/can_reader.py [--frames N] [--channel NAME]

python-can's `Notifier` reads a bus on a thread of its own and calls its listeners
there. Here the listener forwards each frame into a `tsfn.stream`, and the loop reads
the frames with `async for`. The stream's worker starts the notifier and then waits
for its cancellation with `tsfn.cancel_token().wait()`, a blocking wait instead of
a poll; when the consumer leaves, it stops the notifier.

The bus is python-can's `virtual` interface: buses opened on the same channel in one
process hear each other, so a simulated device (a thread here) can send the frames.
With a real interface (`interface="socketcan", channel="can0"`) only `open_bus`
changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import NamedTuple

import can

import tsfn


class Frame(NamedTuple):
    arbitration_id: int
    data: bytes


def open_bus(channel: str) -> can.BusABC:
    return can.Bus(interface="virtual", channel=channel)


class Forward(can.Listener):
    """Called on the notifier's thread: hand each frame to the stream."""

    def __init__(self, emit: Callable[[Frame], None]) -> None:
        self._emit = emit

    def on_message_received(self, msg: can.Message) -> None:
        # A CAN bus cannot be told to wait: while this thread blocks (1024 frames wait
        # for the loop), frames pile up in the interface's receive buffer, and a real
        # interface drops them once that is full. Size the queue for the longest
        # stall of the loop you expect. Closing: the consumer has gone, and the worker
        # is stopping the notifier.
        with contextlib.suppress(tsfn.Closing):
            self._emit(Frame(msg.arbitration_id, bytes(msg.data)))


def read_bus(emit: Callable[[Frame], None], bus: can.BusABC) -> None:
    """The stream's worker: notify `emit` of every frame on `bus` until cancelled."""
    # timeout: how often the notifier's thread checks whether it was stopped.
    notifier = can.Notifier(bus, [Forward(emit)], timeout=0.1)
    tsfn.cancel_token().wait()  # blocks until the consumer leaves; nothing to poll
    notifier.stop()  # joins the notifier's thread
    print("the consumer left: the worker stopped the notifier", flush=True)


def simulated_device(channel: str, count: int) -> None:
    """Another node on the bus: `count` frames, ids 0x100-0x107, a counter as data."""
    with open_bus(channel) as bus:
        for i in range(count):
            frame = can.Message(
                arbitration_id=0x100 + i % 8, data=i.to_bytes(4, "big"), is_extended_id=False
            )
            bus.send(frame)


async def main(channel: str, count: int) -> list[Frame]:
    """Receive the `count` frames a simulated device sends on `channel`."""
    received: list[Frame] = []
    # Open the bus before the device sends: a virtual bus hears only frames sent
    # after it was opened (a real bus, only frames on the wire after that, too).
    with open_bus(channel) as bus:
        device = threading.Thread(target=simulated_device, args=(channel, count))
        async with tsfn.stream(read_bus, bus, max_queue_size=1024) as frames:
            device.start()
            async for frame in frames:  # on the loop thread, in the order sent
                received.append(frame)
                if len(received) == count:
                    break  # leaving the block cancels the worker: it stops the notifier
        # Join the device's thread off the loop: the loop keeps running meanwhile.
        await asyncio.to_thread(device.join)
    counters = [int.from_bytes(frame.data, "big") for frame in received]
    ids = sorted({frame.arbitration_id for frame in received})
    print(f"{len(received)} frames, in order: {counters == list(range(count))}")
    print(f"ids: {', '.join(hex(i) for i in ids)}")
    return received


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Read a CAN bus with python-can and tsfn.")
    parser.add_argument("--frames", type=int, default=1000, help="frames the device sends")
    parser.add_argument("--channel", default="tsfn-demo", help="the virtual bus's channel")
    args = parser.parse_args(argv)
    asyncio.run(main(args.channel, args.frames))


if __name__ == "__main__":
    cli()
