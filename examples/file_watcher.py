"""Watch a directory with watchdog; each change reaches the event loop, in order.

    python examples/file_watcher.py DIRECTORY [--count N]

watchdog's `Observer` runs threads of its own: one reads the operating system's
notifications (inotify on Linux), one calls your event handler. Here the handler
forwards each change into a `tsfn.stream`, and the loop reads the changes with
`async for`. The stream's worker starts the observer and then only waits in
`observer.join()`; it cannot poll anything, so a cancellation hook
(`tsfn.cancel_token().on_cancel(observer.stop)`) stops the observer when the
consumer leaves: after `--count` changes, or on Ctrl+C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

import tsfn

Change = tuple[str, str]  # (what happened, which path: relative to the directory)


class Forward(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: hand each change to the stream."""

    def __init__(self, emit: Callable[[Change], None], root: str) -> None:
        self._emit = emit
        self._root = root

    def _relative(self, path: bytes | str) -> str:
        return os.path.relpath(os.fsdecode(path), self._root)

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "deleted"):
            return  # keep the demo's output short: no "modified", "opened", "closed"
        where = self._relative(event.src_path)
        if event.event_type == "moved":
            where += f" -> {self._relative(event.dest_path)}"
        # Blocks while 64 changes wait for the loop: this thread is watchdog's
        # dispatcher, which may wait (the notifications queue up in watchdog
        # meanwhile). Closing: the consumer has gone, and the cancellation hook is
        # stopping the observer.
        with contextlib.suppress(tsfn.Closing):
            self._emit((event.event_type, where))


def watch(emit: Callable[[Change], None], directory: str) -> None:
    """The stream's worker: run an Observer on `directory` until the consumer leaves."""
    observer = Observer()
    observer.schedule(Forward(emit, directory), directory, recursive=True)
    observer.start()  # the directory is watched once start() returns
    print(f"watching {directory}", flush=True)
    # The worker has nothing to poll while the observer runs: let the cancellation
    # stop it. observer.stop() runs on tsfn's hooks thread, where it may wait for
    # watchdog's lock (held while our handler runs); the `with` removes the hook if
    # the observer ends on its own.
    with tsfn.cancel_token().on_cancel(observer.stop):
        observer.join()
    print(f"observer stopped; its thread is alive: {observer.is_alive()}", flush=True)


async def main(directory: str, count: int | None) -> int:
    """Print the changes under `directory`; stop after `count` of them (None: never)."""
    seen = 0
    async with tsfn.stream(watch, directory) as changes:
        async for kind, path in changes:  # on the loop thread, in the order they happened
            print(f"{kind}: {path}", flush=True)
            seen += 1
            if seen == count:
                break  # leaving the block cancels the worker: the hook stops the observer
    # The block has exited, so the worker has returned: the observer is stopped.
    print(f"{seen} changes")
    return seen


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Watch a directory with watchdog and tsfn.")
    parser.add_argument("directory", help="the directory to watch (recursively)")
    parser.add_argument("--count", type=int, default=None, help="stop after N changes")
    args = parser.parse_args(argv)
    try:
        asyncio.run(main(os.path.abspath(args.directory), args.count))
    except KeyboardInterrupt:
        print("interrupted: the observer was stopped")


if __name__ == "__main__":
    cli()
