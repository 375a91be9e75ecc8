"""The tutorial's program: a long search on worker threads streams each hit to the loop.

    python examples/stream_search.py [PATTERN] [--root DIR] [--variant stream|napi]

It searches the Python files under DIR (default: the standard library) for PATTERN, a
regular expression, and prints each matching line as soon as a worker thread finds it.
Meanwhile a heartbeat task on the event loop ticks every 10 ms, to show that the loop
never stalls.

--variant stream   the search with tsfn.stream, in ten lines (the default; tutorial,
                   part 1)
--variant napi     the same search in the Node-API C pattern: a ThreadsafeFunction and
                   one AsyncWork per worker thread; acquire, call, release, finalizer
                   (tutorial, part 2)
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import tsfn

HEARTBEAT = 0.010  # seconds between two ticks of the heartbeat


def search_file(path: Path, pattern: re.Pattern[str]) -> list[str]:
    """Every line of `path` that matches `pattern`, as ``path:number: text``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # unreadable, or removed since we listed it: nothing to find
        return []
    return [
        f"{path}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if pattern.search(line)
    ]


# --8<-- [start:napi]
async def search_napi(
    pattern: re.Pattern[str], files: list[Path], workers: int, show: Callable[[str], None]
) -> None:
    """Part 2: Node-API's pattern, each step named after the C call it stands for."""

    # napi_create_threadsafe_function(env, NULL, ..., max_queue_size=256,
    #     initial_thread_count=1, ...): the one initial producer is this, the loop
    #     thread (Node's "main thread"). `show` is the call_js_cb: it runs on the
    #     loop thread, once per hit, in the order each worker found them.
    hits = tsfn.ThreadsafeFunction(show, max_queue_size=256, name="hits")

    def execute(part: list[Path]) -> None:
        # ExecuteWork, on a worker thread of the executor (libuv's thread pool).
        with hits.acquire():  # napi_acquire_threadsafe_function
            for path in part:
                for hit in search_file(path, pattern):
                    # napi_call_threadsafe_function(hits, hit, napi_tsfn_blocking):
                    # waits while 256 hits are queued, so a slow loop slows the workers.
                    hits.call(hit)
        # Leaving the `with` block: napi_release_threadsafe_function(napi_tsfn_release).

    pending = workers

    def complete(status: tsfn.Status, part: list[Path]) -> None:
        # WorkComplete, on the loop thread, after `execute` returned (or raised).
        nonlocal pending
        pending -= 1
        if pending == 0:
            # The last work is done: release the loop thread's own count. The count
            # is now zero, so the function closes once every queued hit is delivered.
            hits.release()

    # napi_create_async_work + napi_queue_async_work, once per worker thread.
    works = [tsfn.AsyncWork(execute, complete, data=files[i::workers]) for i in range(workers)]
    for work in works:
        work.queue()

    # The finalizer has run: every hit was delivered. (In C, finalize_cb would signal this.)
    await hits.wait_closed()
    # Node's complete only gets a status; awaiting a work also re-raises execute's error.
    await asyncio.gather(*works)
    # --8<-- [end:napi]


# --8<-- [start:stream]
def search(emit: Callable[[str], None], pattern: re.Pattern[str], files: list[Path]) -> None:
    for path in files:  # on a worker thread
        for hit in search_file(path, pattern):
            emit(hit)  # waits while 64 hits are queued for the loop


async def search_stream(
    pattern: re.Pattern[str], files: list[Path], show: Callable[[str], None]
) -> None:
    """Part 1: the search with tsfn.stream."""
    async with tsfn.stream(search, pattern, files) as hits:
        async for hit in hits:  # on the loop thread, in the order they were found
            show(hit)
    # --8<-- [end:stream]


async def heartbeat(lags: list[float]) -> None:
    """Tick every HEARTBEAT seconds; record how late each tick was."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(HEARTBEAT)
        lags.append(time.perf_counter() - start - HEARTBEAT)


async def main(
    pattern: re.Pattern[str], files: list[Path], variant: str, workers: int, limit: int
) -> int:
    """Search `files`, print the first `limit` hits and a summary; return the hit count."""
    found = 0

    def show(hit: str) -> None:  # always on the loop thread: no lock needed for `found`
        nonlocal found
        found += 1
        if found <= limit:
            print(hit)

    lags: list[float] = []
    ticker = asyncio.create_task(heartbeat(lags))
    started = time.perf_counter()
    if variant == "napi":
        await search_napi(pattern, files, workers, show)
    else:
        await search_stream(pattern, files, show)
    elapsed = time.perf_counter() - started
    ticker.cancel()

    if found > limit:
        print(f"... and {found - limit} more")
    print(f"{found} hits in {len(files)} files in {elapsed:.2f} s")
    worst = max(lags, default=0.0) * 1000
    print(f"heartbeat: the loop ticked {len(lags)} times meanwhile, worst lag {worst:.1f} ms")
    return found


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Stream regex hits from worker threads to the event loop."
    )
    parser.add_argument("pattern", nargs="?", default=r"\bthreading\.Thread\(", help="a regex")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="directory to search (default: the standard library)",
    )
    parser.add_argument("--variant", choices=["stream", "napi"], default="stream")
    parser.add_argument("--workers", type=int, default=4, help="worker threads (napi variant)")
    parser.add_argument("--show", type=int, default=10, help="how many hits to print")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        pattern = re.compile(args.pattern)
    except re.error as exc:
        parser.error(f"bad pattern {args.pattern!r}: {exc}")
    # Sorted, so both variants search in the same order; packages installed into the
    # standard library's site-packages are not part of it.
    files = sorted(p for p in args.root.rglob("*.py") if "site-packages" not in p.parts)
    print(f"searching {len(files)} files under {args.root} for {pattern.pattern!r}")
    asyncio.run(main(pattern, files, args.variant, args.workers, args.show))


if __name__ == "__main__":
    cli()
