"""The recipes for libraries that call back from threads they own, against the real thing.

Each example in examples/ runs as a user would run it (``python -X dev
examples/NAME.py``) against the real library: watchdog's Observer on real inotify
events in a temporary directory, paho-mqtt against a real mosquitto broker that the
test starts on 127.0.0.1 (a free port, a config file in a temporary directory) and
stops by PID, python-can's Notifier on its virtual bus, and a C library compiled with
cffi whose pthread calls back. A test is skipped, saying why, only where the thing
cannot be had here (no mosquitto, no C compiler).

The last part checks the shutdown order of docs/howto/shutdown.md with a real
watchdog Observer: stopping it while its handler waits in a blocking `call` hangs
for as long as the loop cannot deliver; `abort()` first lets the stop go through.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio.to_thread
import pytest
from test_examples import EXAMPLES, example_env, run_example

import tsfn

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

# Where Debian puts mosquitto (/usr/sbin), which a non-root PATH may lack.
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=SBIN)
NO_MOSQUITTO = "mosquitto is not installed (python3 dev.py test installs it with apt-get as root)"


class Running:
    """A program a test started: its output, line by line, and a stop by its PID."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            args,
            cwd=EXAMPLES.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []  # stdout, so far
        self.errors: list[str] = []  # stderr, so far
        self._new: queue.Queue[str | None] = queue.Queue()  # either; None: one ended
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(pipe, into), daemon=True)
            for pipe, into in (
                (self.process.stdout, self.lines),
                (self.process.stderr, self.errors),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[str], into: list[str]) -> None:
        for line in pipe:
            into.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)
        pipe.close()

    def wait_for_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The next line of output (stdout or stderr) that matches `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                output = "\n".join(self.lines + self.errors)
                raise AssertionError(f"no line matching {pattern!r} in:\n{output}")
            if match := re.search(pattern, line):
                return match

    def wait(self, timeout: float = 30) -> str:
        """Wait for the program to exit; check it exited cleanly; return its stdout."""
        returncode = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        output, errors = "\n".join(self.lines), "\n".join(self.errors)
        assert returncode == 0, f"exit status {returncode}:\n{output}\n{errors}"
        # As in test_examples.py: asyncio's debug mode may log a slow callback on a
        # busy machine; anything else on stderr is a real problem.
        for marker in ("Traceback", "Error", "Warning", "was never", "Exception"):
            assert marker not in errors, f"{marker!r} on stderr:\n{errors}"
        return output

    def stop(self) -> None:
        """Stop the program by its PID: SIGTERM, then SIGKILL if it does not go."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(timeout=10)


def start_example(name: str, *args: str) -> Running:
    return Running([sys.executable, "-X", "dev", str(EXAMPLES / name), *args], env=example_env())


@pytest.fixture
def started() -> Iterator[list[Running]]:
    """Programs a test starts; each is stopped by PID at the end, whatever happened."""
    running: list[Running] = []
    yield running
    for program in running:
        program.stop()


# -- watchdog: examples/file_watcher.py ---------------------------------------------------


def test_file_watcher_reports_each_change_in_order_then_stops_the_observer(
    tmp_path: Path, started: list[Running]
) -> None:
    watcher = start_example("file_watcher.py", str(tmp_path), "--count", "3")
    started.append(watcher)
    watcher.wait_for_line(r"^watching ")  # the inotify watch is in place
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    (tmp_path / "b.txt").unlink()
    output = watcher.wait()
    assert watcher.lines[1:] == [
        "created: a.txt",
        "moved: a.txt -> b.txt",
        "deleted: b.txt",
        # The consumer left after 3 changes; the hook stopped the observer, whose
        # join returned in the worker, before the stream's block exited.
        "observer stopped; its thread is alive: False",
        "3 changes",
    ], output


# -- paho-mqtt against mosquitto: examples/mqtt_client.py -----------------------------------


@dataclass
class Broker:
    port: int


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def start_broker(tmp_path: Path, started: list[Running]) -> Callable[[int], Broker]:
    """Start a mosquitto on 127.0.0.1 with the given `max_inflight_messages`."""
    if MOSQUITTO is None:
        pytest.skip(NO_MOSQUITTO)
    mosquitto = MOSQUITTO

    def start(max_inflight: int) -> Broker:
        port = free_port()
        config = tmp_path / f"mosquitto-{port}.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"  # sessions live in memory, as long as this broker
            f"max_inflight_messages {max_inflight}\n"
            "log_dest stderr\n"  # unbuffered: the "running" line arrives at once
        )
        broker = Running([mosquitto, "-c", str(config)])
        started.append(broker)
        broker.wait_for_line(r"mosquitto version \S+ running")
        return Broker(port)

    return start


def publish(broker: Broker, topic: str, payloads: list[str]) -> None:
    """Publish `payloads` with QoS 1, each acknowledged by the broker before the next."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def redelivered(broker: Broker, topic: str, client_id: str) -> list[tuple[str, bool]]:
    """Reconnect as `client_id` and return what its session still held: (payload, dup).

    The broker resends a session's unacknowledged messages as soon as the client is
    back; a marker published after subscribing comes after them, so everything that
    arrives before the marker is what the session held.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    marker = f"marker-{uuid.uuid4()}"
    got: list[tuple[str, bool]] = []
    seen_marker = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        payload = message.payload.decode()
        if payload == marker:
            seen_marker.set()
        elif not seen_marker.is_set():
            got.append((payload, bool(message.dup)))

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, *_: c.publish(topic, marker, qos=1)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert seen_marker.wait(timeout=20), "the marker never came back"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def run_subscriber(broker: Broker, count: int, *extra: str) -> tuple[Running, str, str]:
    topic, client_id = f"tsfn/test/{uuid.uuid4()}", f"tsfn-test-{uuid.uuid4().hex[:8]}"
    args = ["--port", str(broker.port), "--topic", topic, "--client-id", client_id]
    subscriber = start_example("mqtt_client.py", *args, "--count", str(count), *extra)
    subscriber.wait_for_line(rf"^subscribed to {re.escape(topic)}$")
    return subscriber, topic, client_id


def test_mqtt_acknowledges_each_message_only_after_the_loop_handled_it(
    start_broker: Callable[[int], Broker], started: list[Running]
) -> None:
    # With an in-flight window of 1, the broker sends the next message only once the
    # previous one is acknowledged. The subscriber never saw 2 messages unacknowledged
    # at once: each ack came from the loop, after handling, before the next arrived.
    broker = start_broker(1)
    count = 100
    subscriber, topic, client_id = run_subscriber(broker, count)
    started.append(subscriber)
    payloads = [f"m{i}" for i in range(count)]
    publish(broker, topic, payloads)
    output = subscriber.wait()
    assert [line.removeprefix("handled ") for line in subscriber.lines[1:-2]] == payloads
    assert f"{count} messages handled and acknowledged" in output
    assert "at most 1 messages were unacknowledged at once" in output
    assert redelivered(broker, topic, client_id) == []  # the broker holds nothing back


def test_mqtt_a_message_the_loop_failed_to_handle_is_delivered_again(
    start_broker: Callable[[int], Broker], started: list[Running]
) -> None:
    broker = start_broker(20)  # mosquitto's default window
    subscriber, topic, client_id = run_subscriber(broker, 10, "--fail-on", "m3")
    started.append(subscriber)
    publish(broker, topic, [f"m{i}" for i in range(10)])
    output = subscriber.wait()
    assert "not acknowledged: m3 (could not store 'm3')" in output
    assert "9 messages handled and acknowledged" in output
    # Its session kept m3 unacknowledged: back it comes, marked as a duplicate.
    assert redelivered(broker, topic, client_id) == [("m3", True)]


# -- python-can: examples/can_reader.py -------------------------------------------------------


def test_can_reader_gets_every_frame_in_order_and_stops_the_notifier() -> None:
    channel = f"tsfn-test-{uuid.uuid4().hex[:8]}"  # a bus of its own
    output = run_example("can_reader.py", "--frames", "3000", "--channel", channel)
    assert output.splitlines() == [
        "the consumer left: the worker stopped the notifier",
        "3000 frames, in order: True",
        "ids: 0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107",
    ]


# -- cffi: examples/cffi_callbacks.py -----------------------------------------------------


def cffi_missing() -> str | None:
    """Why cffi cannot build an extension here, or None if it can."""
    if os.name != "posix":
        return "the example needs pthreads"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler (cc)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return "no Python.h for this interpreter"
    return None


@pytest.mark.skipif(cffi_missing() is not None, reason=str(cffi_missing()))
def test_cffi_samples_arrive_in_order_and_the_hook_stops_the_c_thread() -> None:
    samples = 3000
    output = run_example("cffi_callbacks.py", "--samples", str(samples))
    total = sum(0.5 * i for i in range(samples))
    assert output.splitlines()[1:] == [
        # The C thread idles after its samples until sensor_stop(): only the hook,
        # run when the consumer left, ends it, and the worker's sensor_join.
        "the consumer left: the hook called sensor_stop() and the C thread ended",
        f"{samples} samples, in order: True, sum of values: {total}",
    ]
    assert output.startswith("built _sensor_cffi")


# -- the shutdown order, with a real watchdog Observer ----------------------------------------


class BlockedObserver:
    """A watchdog Observer whose handler waits in a blocking `call`: the queue (size 1)
    is full and the loop thread is busy, so the second created file's call waits."""

    def __init__(self, directory: Path) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.delivered: list[str] = []
        self.fn: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(
            self.delivered.append, max_queue_size=1, name="created files"
        )
        self.waiting = threading.Event()  # the handler is about to wait in call
        self.outcomes: list[str] = []
        fn, waiting, outcomes = self.fn, self.waiting, self.outcomes

        class Handler(FileSystemEventHandler):
            def on_created(self, event: FileSystemEvent) -> None:
                if fn.qsize() == 1:
                    waiting.set()
                try:
                    fn.call(os.fsdecode(event.src_path))
                    outcomes.append("delivered")
                except tsfn.Closing:
                    outcomes.append("Closing")

        self.observer = Observer()
        self.observer.schedule(Handler(), str(directory))
        self.observer.start()
        # On the loop thread, without awaiting: the loop cannot deliver meanwhile.
        (directory / "one").touch()
        (directory / "two").touch()
        assert self.waiting.wait(10)


async def test_stopping_an_observer_whose_handler_waits_hangs_until_abort(
    tmp_path: Path,
) -> None:
    blocked = BlockedObserver(tmp_path)
    # The wrong order: observer.stop() while the handler waits for the loop. On the
    # loop thread it would never return (the loop is what the handler waits for);
    # on a helper thread, with the loop thread still blocked, we can watch it hang:
    # watchdog's stop() waits for the lock its dispatcher holds around our handler.
    stopper = threading.Thread(target=blocked.observer.stop, name="stopper")
    stopper.start()
    stopper.join(timeout=0.5)
    assert stopper.is_alive()  # it cannot finish while the handler waits
    # The right order: abort first. The waiting call raises Closing at once, the
    # handler returns, watchdog's lock is free, and stop() goes through.
    blocked.fn.abort()
    await anyio.to_thread.run_sync(stopper.join)
    await anyio.to_thread.run_sync(blocked.observer.join)  # join off the loop
    assert blocked.outcomes == ["delivered", "Closing"]
    await blocked.fn.wait_closed()
    assert blocked.delivered == []  # aborted: the queued item was discarded


async def test_abort_then_stop_and_join_off_the_loop_never_hangs(tmp_path: Path) -> None:
    blocked = BlockedObserver(tmp_path)
    blocked.fn.abort()
    await anyio.to_thread.run_sync(blocked.observer.stop)
    await anyio.to_thread.run_sync(blocked.observer.join)
    assert not blocked.observer.is_alive()
    assert blocked.outcomes == ["delivered", "Closing"]
    await blocked.fn.wait_closed()
