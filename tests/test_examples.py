"""Every program in examples/ runs, as a user would run it, and does what its page says.

Each example runs in a subprocess (``python -X dev examples/NAME.py ...``) with small
arguments, from the repository root, with the checkout first on PYTHONPATH so it
imports this tsfn even where tsfn is not installed. The checks compare the output
with what the test computes independently (the hits of a search, the digest of the
hashed blocks, the samples a native thread sent).

sse_server.py is run as a real server on 127.0.0.1 (a free port) and read with an
httpx client: every event arrives, in order, and a client that stops reading holds
the worker back instead of letting results pile up in the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(40)


def example_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_example(name: str, *args: str) -> str:
    """Run examples/NAME.py with `args`; check it exits cleanly; return its stdout."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", str(EXAMPLES / name), *args],
        cwd=ROOT,
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    # -X dev turns on asyncio's debug mode, which may log slow callbacks on a busy
    # machine; anything else on stderr is a real problem (an unhandled exception in a
    # callback, a never-retrieved exception, a ResourceWarning).
    for marker in ("Traceback", "Error", "Warning", "was never", "Exception"):
        assert marker not in done.stderr, f"{name} wrote to stderr:\n{done.stderr}"
    return done.stdout


def test_every_example_has_a_test_here() -> None:
    """A new example must be run by this file too (or, for a recipe, test_recipes.py)."""
    tested = {"stream_search.py", "progress_bar.py", "native_callbacks.py", "sse_server.py"}
    tested |= {"file_watcher.py", "mqtt_client.py", "can_reader.py", "cffi_callbacks.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


# -- stream_search.py -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["napi", "stream"])
def test_stream_search_prints_every_hit_once(variant: str) -> None:
    # Search this repository's own package: small, and its content is known here.
    root = ROOT / "tsfn"
    pattern = re.compile(r"\bdef \w+\(self")
    expected = set()
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                expected.add(f"{path}:{number}: {line.strip()}")
    assert len(expected) > 20  # enough hits for several workers to interleave

    out = run_example(
        "stream_search.py",
        pattern.pattern,
        "--root",
        str(root),
        "--variant",
        variant,
        "--workers",
        "3",
        "--show",
        "100000",
    )
    hits = [line for line in out.splitlines() if line.startswith(str(root))]
    assert sorted(hits) == sorted(expected)  # each hit exactly once
    files = len(list(root.rglob("*.py")))
    assert f"{len(expected)} hits in {files} files in " in out
    assert "heartbeat: the loop ticked" in out


def test_stream_search_stream_variant_keeps_file_order() -> None:
    """One worker, one stream: hits arrive in the order the files were searched."""
    root = ROOT / "tsfn"
    out = run_example(
        "stream_search.py", r"^class ", "--root", str(root), "--variant", "stream", "--show", "999"
    )
    hits = [line for line in out.splitlines() if line.startswith(str(root))]
    keys = [(h.split(":")[0], int(h.split(":")[1])) for h in hits]
    assert keys == sorted(keys)
    assert len(hits) >= 5


# -- progress_bar.py ------------------------------------------------------------------


def test_progress_bar_ends_at_the_last_count_with_the_workers_result() -> None:
    pytest.importorskip("rich")
    blocks, block_size = 300, 4 * 1024
    out = run_example("progress_bar.py", "--blocks", str(blocks), "--block-kib", "4")

    digest = hashlib.sha256()
    block = bytearray(block_size)
    for i in range(blocks):
        block[:8] = i.to_bytes(8, "little")
        digest.update(block)
    assert f"sha256: {digest.hexdigest()}" in out  # the worker's return value came through
    # Latest-only: the last count always arrives, so the bar ends full.
    assert f"the bar ended at {blocks} of {blocks} blocks" in out
    seen = re.search(r"the worker emitted (\d+) counts; (\d+) reached the loop", out)
    assert seen is not None, out
    assert int(seen[1]) == blocks
    assert 1 <= int(seen[2]) <= blocks


# -- native_callbacks.py --------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="the example needs pthreads")
@pytest.mark.parametrize(
    "how",
    [
        pytest.param("cc", marks=pytest.mark.skipif(shutil.which("cc") is None, reason="no cc")),
        "libc",
    ],
)
def test_native_thread_samples_arrive_in_order_on_the_loop_thread(how: str) -> None:
    samples = 3000
    args = ["--samples", str(samples)] + (["--libc"] if how == "libc" else [])
    out = run_example("native_callbacks.py", *args)
    if how == "cc":
        assert "built libsensor.so with" in out
    total = sum(0.5 * i for i in range(samples))
    assert f"{samples} samples, in order: True, sum of values: {total}" in out
    # The C library called back on its one thread; delivery was on the loop's.
    assert "called back on 1 native thread, not the loop's: True" in out
    assert "delivered on ['MainThread'], the loop's thread" in out


# -- sse_server.py --------------------------------------------------------------------

QUEUE = 8  # examples/sse_server.py's QUEUE: the stream's max_queue_size
BOUND = QUEUE + 1  # how far the worker may be ahead of the response, at most


@dataclass
class Server:
    url: str
    log: queue.Queue[str]  # the server's output, line by line

    def wait_for_line(self, pattern: str, timeout: float = 15) -> re.Match[str]:
        """The first line of the server's output (from now on) that matches `pattern`."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            try:
                line = self.log.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                output = "".join(seen)
                raise AssertionError(f"no {pattern!r} in the server's output:\n{output}") from None
            if match := re.search(pattern, line):
                return match
            seen.append(line)


@pytest.fixture(scope="module")
def sse_server() -> Iterator[Server]:
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    process = subprocess.Popen(
        [sys.executable, "-X", "dev", str(EXAMPLES / "sse_server.py"), "--port", "0"],
        cwd=ROOT,
        env=example_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout

    def read_log() -> None:
        for line in stdout:
            log.put(line)

    reader = threading.Thread(target=read_log, name="sse-server-log", daemon=True)
    reader.start()
    try:
        server = Server("", log)
        started = server.wait_for_line(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
        server.url = started[1]
        yield server
    finally:
        process.terminate()  # uvicorn shuts down gracefully on SIGTERM
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        stdout.close()


def read_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse a text/event-stream into (event type, decoded JSON data) pairs."""
    kind, data = "message", ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif line == "" and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


def test_sse_every_event_arrives_in_order_and_the_worker_stays_within_the_bound(
    sse_server: Server,
) -> None:
    import httpx

    count = 300
    numbers = []
    with (
        httpx.Client(timeout=20) as client,
        client.stream("GET", f"{sse_server.url}/results?count={count}&size=2048") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response.iter_lines())
        for kind, data in events:
            if kind == "end":
                end = data
                break
            numbers.append(data["n"])
            # The worker recorded how far ahead of the response it was.
            assert 0 <= data["ahead"] <= BOUND, data["ahead"]
            assert len(data["padding"]) == 2048
            time.sleep(0.001)  # a slowish client (the bound must hold at any speed)
    assert numbers == list(range(count))
    assert end == {"count": count, "max_ahead": end["max_ahead"]}
    assert end["max_ahead"] <= BOUND
    sse_server.wait_for_line(rf"complete after {count} of {count} results")


def test_sse_a_client_that_stops_reading_holds_the_worker_back(sse_server: Server) -> None:
    import httpx

    count, size = 100_000, 64 * 1024  # 6.4 GB of events if nothing held the worker back
    url = f"{sse_server.url}/results?count={count}&size={size}"
    with httpx.Client(timeout=20) as client, client.stream("GET", url) as response:
        events = read_events(response.iter_lines())
        first = [next(events)[1]["n"] for _ in range(3)]
        assert first == [0, 1, 2]
        # Now the client stops reading: the kernel's socket buffers fill up, then the
        # response cannot send, then the stream's queue fills, then the worker waits
        # in emit. How long we wait only gives a missing backpressure time to show.
        time.sleep(0.5)
        stats = [s for s in client.get(f"{sse_server.url}/stats").json() if s["count"] == count]
        progress = stats[-1]
        assert not progress["done"]
        # Within the server, the worker is never more than BOUND results ahead of the
        # response; and the response is held back by the client: a few MB of socket
        # buffers hold some dozens of 64 KiB events, far from 100000.
        assert progress["emitted"] - progress["read"] <= BOUND
        assert progress["emitted"] < 2000, progress
    # Leaving the block closed the connection: the worker's next emit raised Closing
    # and it stopped, as the server's log says.
    left = sse_server.wait_for_line(
        rf"client left after (\d+) of {count} results; the worker emitted (\d+)"
    )
    read, emitted = int(left[1]), int(left[2])
    assert emitted - read <= BOUND
    assert emitted < 2000
