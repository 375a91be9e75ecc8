"""Server-Sent Events from worker threads, with backpressure: Starlette served by uvicorn.

    python examples/sse_server.py [--port 8000]
    curl -N 'http://127.0.0.1:8000/results?count=20'     (or open / in a browser)

``GET /results?count=N&size=B`` runs a computation on a worker thread and streams each
of its N results as one SSE event as soon as it is ready (B bytes of padding per event
make the events as big as real ones). The endpoint reads the results through
``tsfn.stream(..., max_queue_size=QUEUE)``, so the worker is never more than QUEUE + 1
results ahead of the response: when the client reads slowly, the socket fills up, the
response waits to send, and the worker waits in `emit`. Memory stays flat however
slow the client. When the client goes away, the worker's next `emit` raises
`tsfn.Closing` and the worker stops.

Each event carries ``ahead``: how many results the worker had produced beyond the one
being sent. ``GET /stats`` shows the same counters for the latest streams.

Needs `starlette` and `uvicorn` (``pip install starlette uvicorn``, or the project's
``examples`` extra).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

import tsfn

QUEUE = 8  # results that may wait between the worker and the response
MAX_COUNT = 1_000_000
MAX_SIZE = 1 << 20


@dataclass
class Progress:
    """One stream's counters. The worker writes `emitted`; the loop writes the rest."""

    id: int
    count: int
    emitted: int = 0  # results the worker has handed to emit() (and emit accepted)
    read: int = 0  # results the response has read from the stream
    max_ahead: int = 0  # the most `emitted - read` ever was: at most QUEUE + 1
    done: bool = False  # the worker has returned and the response has ended
    outcome: str = "running"


# --8<-- [start:events]
def compute(emit: Callable[[tuple[int, str]], None], progress: Progress) -> None:
    """The worker: produce `progress.count` results, emitting each one when ready."""
    for n in range(progress.count):
        value = hashlib.sha256(str(n).encode()).hexdigest()[:16]  # stands for real work
        emit((n, value))  # waits while QUEUE results are queued: backpressure
        progress.emitted = n + 1


async def events(
    progress: Progress, size: int, pool: concurrent.futures.Executor
) -> AsyncIterator[str]:
    """The response body: one SSE event per result, then an `end` event."""
    padding = "x" * size
    try:
        stream = tsfn.stream(compute, progress, max_queue_size=QUEUE, executor=pool)
        async with stream as results:
            async for n, value in results:
                progress.read = n + 1
                ahead = progress.emitted - progress.read
                progress.max_ahead = max(progress.max_ahead, ahead)
                data = {"n": n, "value": value, "ahead": ahead, "padding": padding}
                yield f"id: {n}\ndata: {json.dumps(data)}\n\n"
        progress.outcome = "complete"
        end = {"count": progress.count, "max_ahead": progress.max_ahead}
        yield f"event: end\ndata: {json.dumps(end)}\n\n"
    finally:
        # Reached when the stream ends, and also when the client disconnects: then the
        # `async with` above has already stopped the worker (its emit raised Closing).
        progress.done = True
        if progress.outcome == "running":
            progress.outcome = "client left"
        print(
            f"stream {progress.id}: {progress.outcome} after {progress.read} of "
            f"{progress.count} results; the worker emitted {progress.emitted}, "
            f"at most {progress.max_ahead} ahead",
            flush=True,
        )
        # --8<-- [end:events]


def create_app(max_streams: int = 32) -> Starlette:
    """The app: at most `max_streams` streams run at once, each on a worker thread."""
    # Each open stream holds a worker thread until it ends, so the streams get a pool
    # of their own: the loop's default executor has only a few threads (cpu count + 4)
    # and other code needs it too.
    pool = concurrent.futures.ThreadPoolExecutor(max_streams, thread_name_prefix="sse-worker")
    streams: deque[Progress] = deque(maxlen=20)  # the latest ones, for /stats
    ids = itertools.count(1)

    async def results(request: Request) -> Response:
        try:
            count = int(request.query_params.get("count", "100"))
            size = int(request.query_params.get("size", "0"))
        except ValueError:
            return PlainTextResponse("count and size must be integers", status_code=400)
        if not (0 <= count <= MAX_COUNT and 0 <= size <= MAX_SIZE):
            message = f"need 0 <= count <= {MAX_COUNT} and 0 <= size <= {MAX_SIZE}"
            return PlainTextResponse(message, status_code=400)
        progress = Progress(id=next(ids), count=count)
        streams.append(progress)
        body = events(progress, size, pool)
        return StreamingResponse(body, media_type="text/event-stream")

    async def stats(request: Request) -> Response:
        return JSONResponse([asdict(p) for p in streams])

    async def home(request: Request) -> Response:
        return HTMLResponse(PAGE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        # Do not wait here for workers: one still emitting would hold up the loop.
        # They stop when the loop shuts down (their emit raises Closing).
        pool.shutdown(wait=False)

    routes = [Route("/", home), Route("/results", results), Route("/stats", stats)]
    return Starlette(routes=routes, lifespan=lifespan)


PAGE = """<!doctype html>
<title>tsfn: results from a worker thread</title>
<p>Results from a worker thread, as Server-Sent Events:</p>
<pre id="out"></pre>
<script>
  const out = document.getElementById("out");
  const source = new EventSource("/results?count=50");
  source.onmessage = (e) => { const d = JSON.parse(e.data); out.textContent += d.n + " " + d.value + "\\n"; };
  source.addEventListener("end", () => { out.textContent += "end\\n"; source.close(); });
</script>
"""


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stream worker results as Server-Sent Events.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    cli()
