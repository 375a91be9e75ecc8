"""A long computation on a worker thread drives a `rich` progress bar on the event loop.

    python examples/progress_bar.py [--blocks N] [--block-kib K]

The worker hashes N blocks of K KiB and reports after each block how many are done,
through ``tsfn.stream(..., latest=True)``: `emit` never blocks the worker, and the
loop sees only the newest count since it last looked. Older counts are dropped, the
last one never is, so the bar always ends at 100 % and a fast worker cannot flood the
loop with updates nobody will see.

Needs `rich` (``pip install rich``, or the project's ``examples`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import tsfn


def crunch(emit: Callable[[int], None], blocks: int, block_size: int) -> str:
    """On a worker thread: hash `blocks` blocks of data, emitting the count done."""
    digest = hashlib.sha256()
    block = bytearray(block_size)
    for i in range(blocks):
        block[:8] = i.to_bytes(8, "little")  # every block differs a little
        digest.update(block)  # hashlib lets other threads run while it hashes
        emit(i + 1)  # never blocks: it replaces any count the loop has not seen yet
    return digest.hexdigest()


async def main(blocks: int, block_size: int) -> None:
    seen = 0  # how many counts reached the loop
    columns = (
        TextColumn("hashing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        bar = progress.add_task("hashing", total=blocks)
        async with tsfn.stream(crunch, blocks, block_size, latest=True) as done:
            async for count in done:  # on the loop thread: the newest count only
                seen += 1
                progress.update(bar, completed=count)
            final = progress.tasks[0].completed
    print(f"sha256: {done.result}")
    print(f"the bar ended at {final:.0f} of {blocks} blocks")
    print(f"the worker emitted {blocks} counts; {seen} reached the loop, the rest were superseded")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A rich progress bar fed by a worker thread.")
    parser.add_argument("--blocks", type=int, default=4000, help="blocks to hash (default 4000)")
    parser.add_argument("--block-kib", type=int, default=256, help="KiB per block (default 256)")
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.block_kib < 1:
        parser.error("--blocks and --block-kib must be >= 1")
    asyncio.run(main(args.blocks, args.block_kib * 1024))


if __name__ == "__main__":
    cli()
