"""An MQTT subscriber (paho-mqtt) whose messages are handled on the event loop.

    python examples/mqtt_client.py [--host H] [--port P] [--topic T] [--count N]

paho-mqtt runs its network thread itself (`loop_start()`) and calls `on_message`
there, once per message. That thread also answers the broker's keepalive pings, so
it must never wait for the loop: a thread that sat in a blocking `call` past the
keepalive got the client disconnected by the broker, and its QoS 1 messages lost.

So `on_message` hands each message over with `call_nowait` to an *unbounded*
`ThreadsafeFunction`, and never waits. The bound is the protocol's: with
`manual_ack=True` a message is acknowledged only once the loop has handled it (the
function's callback stores it, then calls `client.ack`), and a broker sends no more
unacknowledged QoS 1 messages than its in-flight window (mosquitto's
`max_inflight_messages`). A message whose handling failed is not acknowledged: the
broker delivers it again when this client reconnects (its session is persistent:
`clean_session=False`).

`--fail-on PAYLOAD` makes the handler fail for that payload, to see it come back.
Try it against a local mosquitto, and publish with `mosquitto_pub -q 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import tsfn


class Store:
    """What a real program does with each message (a database write), on the loop."""

    def __init__(self, fail_on: str | None) -> None:
        self.fail_on = fail_on
        self.payloads: list[str] = []

    def save(self, payload: str) -> None:
        if payload == self.fail_on:
            raise ValueError(f"could not store {payload!r}")
        self.payloads.append(payload)
        print(f"handled {payload}", flush=True)


class Acks:
    """Counts the messages handed to the loop and not acknowledged yet.

    Updated from paho's thread (a message arrives) and the loop's (one is
    acknowledged), hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unacked = 0
        self.most_unacked = 0

    def arrived(self) -> None:
        with self._lock:
            self._unacked += 1
            self.most_unacked = max(self.most_unacked, self._unacked)

    def settled(self) -> None:
        with self._lock:
            self._unacked -= 1


async def main(host: str, port: int, topic: str, client_id: str, count: int, store: Store) -> Acks:
    """Handle `count` QoS 1 messages from `topic`; acknowledge the ones stored."""
    loop = asyncio.get_running_loop()
    subscribed = asyncio.Event()
    all_handled = asyncio.Event()
    handled = 0
    acks = Acks()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, manual_ack=True
    )

    def handle_then_ack(message: mqtt.MQTTMessage) -> None:
        # The function's callback: on the loop thread, once per message, in the order
        # they arrived (so the acks go out in that order too, as MQTT asks).
        nonlocal handled
        payload = message.payload.decode()
        acks.settled()
        try:
            store.save(payload)
        except Exception as exc:  # any failure: do not acknowledge
            print(f"not acknowledged: {payload} ({exc})")
        else:
            client.ack(message.mid, message.qos)  # queues the PUBACK for paho's thread
        handled += 1
        if handled == count:
            all_handled.set()

    # Unbounded (max_queue_size=0): call_nowait never waits and never raises
    # QueueFull. One producer, paho's network thread, released once it has stopped.
    async with tsfn.ThreadsafeFunction(handle_then_ack, name="mqtt") as deliveries:

        def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
            # On paho's network thread: hand the message over and return at once.
            acks.arrived()  # before the hand-over: the loop may handle it at once
            try:
                deliveries.call_nowait(message)
            except tsfn.Closing:  # shutting down: not acknowledged, so the broker
                acks.settled()  # sends it again when this client is back

        def on_connect(client: mqtt.Client, *_: object) -> None:
            client.subscribe(topic, qos=1)  # after every (re)connect: paho's thread

        def on_subscribe(client: mqtt.Client, *_: object) -> None:
            loop.call_soon_threadsafe(subscribed.set)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect_async(host, port, keepalive=10)
        client.loop_start()  # paho's network thread: connects, reads, pings
        try:
            await asyncio.wait_for(subscribed.wait(), timeout=10)
            print(f"subscribed to {topic}", flush=True)
            await all_handled.wait()
        finally:
            # disconnect() queues DISCONNECT after the acks already queued.
            # loop_stop() joins paho's thread: never on the loop thread, which that
            # thread may need (here it never waits for the loop, but a blocking call
            # would). Then the producer releases; after an error, `async with`
            # aborts what is left.
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)
            deliveries.release()
    print(f"{len(store.payloads)} messages handled and acknowledged")
    print(f"at most {acks.most_unacked} messages were unacknowledged at once")
    return acks


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An MQTT subscriber with paho-mqtt and tsfn.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--topic", default="tsfn/demo")
    parser.add_argument("--client-id", default="tsfn-demo", help="its session is persistent")
    parser.add_argument("--count", type=int, default=10, help="messages to handle, then exit")
    parser.add_argument("--fail-on", default=None, help="fail to handle this payload")
    args = parser.parse_args(argv)
    store = Store(args.fail_on)
    asyncio.run(main(args.host, args.port, args.topic, args.client_id, args.count, store))


if __name__ == "__main__":
    cli()
