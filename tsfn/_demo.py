"""The demo that `python -m tsfn [PATTERN] [--root DIR]` runs.

Node-API's own docs motivate threadsafe functions with this scenario: a long search
runs on worker threads and streams each hit to the event loop as soon as it is found,
while the loop stays free for other work. Here the search is a regex over the Python
standard library's source files (every machine has them); a heartbeat task on the loop
ticks every 10 ms and reports its worst lag at the end.

The pattern is Node's: one ThreadsafeFunction with a bounded queue, counted for each
worker (`initial_thread_count`); each worker is an AsyncWork that `call`s it per hit
and `release`s it when done; the finalizer runs when the last worker is through.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sysconfig
import time
from pathlib import Path

import tsfn

HEARTBEAT = 0.010  # seconds between heartbeat ticks


def _search(files: list[Path], pattern: re.Pattern[str], hits: tsfn.ThreadsafeFunction[str]) -> int:
    """Worker: search `files`, `call` each hit; return how many files were read."""
    try:
        for path in files:
            if tsfn.cancelled():
                break
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for number, line in enumerate(text.splitlines(), 1):
                if pattern.search(line):
                    hits.call(f"{path}:{number}: {line.strip()[:100]}")
        return len(files)
    except tsfn.Closing:  # the loop side aborted (Ctrl+C): stop quietly
        return 0
    finally:
        hits.release()


async def _heartbeat(lags: list[float]) -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(HEARTBEAT)
        lags.append(time.perf_counter() - start - HEARTBEAT)


async def main(pattern: re.Pattern[str], files: list[Path], workers: int, show: int) -> int:
    """Search `files` on `workers` threads, print the first `show` hits; return the count."""
    count = 0

    def on_hit(hit: str) -> None:  # runs on the loop thread, one call per hit
        nonlocal count
        count += 1
        if count <= show:
            print(hit)

    lags: list[float] = []
    beat = asyncio.create_task(_heartbeat(lags))
    started = time.perf_counter()
    async with tsfn.ThreadsafeFunction(
        on_hit, max_queue_size=256, initial_thread_count=workers, name="hits"
    ) as hits:
        works = [
            tsfn.AsyncWork(lambda part: _search(part, pattern, hits), data=files[i::workers])
            for i in range(workers)
        ]
        searched = sum(await asyncio.gather(*works))
    elapsed = time.perf_counter() - started
    beat.cancel()
    if count > show:
        print(f"... and {count - show} more")
    worst = max(lags, default=0.0) * 1000
    print(
        f"\n{count} hits for {pattern.pattern!r} in {searched} files "
        f"in {elapsed:.2f} s with {workers} worker threads"
    )
    print(f"heartbeat: {len(lags)} ticks every {HEARTBEAT * 1000:.0f} ms, worst lag {worst:.1f} ms")
    return count


def cli(argv: list[str] | None = None) -> None:
    """Parse the demo's command line (`argv`, default `sys.argv[1:]`) and run it."""
    parser = argparse.ArgumentParser(prog="python -m tsfn", description=__doc__.split("\n\n")[1])
    parser.add_argument("pattern", nargs="?", default=r"\bthread", help="regex to search for")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="directory to search",
    )
    parser.add_argument("--workers", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--show", type=int, default=20, help="hits to print (default 20)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        pattern = re.compile(args.pattern)
    except re.error as exc:
        parser.error(f"bad pattern {args.pattern!r}: {exc}")
    # The standard library only: third-party packages installed beside it are skipped.
    files = sorted(p for p in args.root.rglob("*.py") if "site-packages" not in p.parts)
    print(f"searching {len(files)} files under {args.root} for {pattern.pattern!r}\n")
    tsfn.run(main(pattern, files, args.workers, args.show))
