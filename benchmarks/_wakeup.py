"""Where the latency of one item at a low rate goes: tsfn against raw, split in two.

    python -m benchmarks._wakeup [--n N] [--rounds R] [--loops asyncio,uvloop]

One producer thread sends N items, one per ms (as the latency table's idle row); each
item is a `perf_counter_ns()` stamp taken just before the call. The producer notes
when its call returned, the callback when it ran, so each delay splits into the
producer's part (the call, with its wake-up write) and the loop's part (from the call's
return to the callback: the loop's wake from its poll, taking the GIL, dispatch).

Besides tsfn and raw `call_soon_threadsafe`, raw runs twice more with a fixed spin of
Python work (a few microseconds warm, timed here) in the producer, once before the call
(inside the delay: what extra work before the wake costs) and once after it, before
the producer sleeps (outside the delay: what holding the GIL while the loop wakes
costs). The rounds are interleaved; the table shows medians over all samples, as
ratios to raw in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import threading
import time
from collections.abc import Callable

from benchmarks._cases import run_on

__all__ = ["main"]

VARIANTS = ("raw", "raw, spin before", "raw, spin after", "tsfn")
SPIN = 200  # iterations of the spin loop: a few microseconds warm


def _spin(k: int = SPIN) -> None:
    for _ in range(k):
        pass


def _spin_ns() -> float:
    """The warm cost of one `_spin()`, in ns (best of several timings)."""
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter_ns()
        for _ in range(1000):
            _spin()
        best = min(best, (time.perf_counter_ns() - start) / 1000)
    return best


async def _run(variant: str, n: int) -> tuple[list[int], list[int]]:
    """(delays, producer parts) in ns for `n` items of `variant`."""
    import tsfn

    loop = asyncio.get_running_loop()
    clock = time.perf_counter_ns
    delays: list[int] = []
    calls: list[int] = []
    done = asyncio.Event()

    def put(stamp: int) -> None:
        delays.append(clock() - stamp)
        if len(delays) == n:
            done.set()

    fn: tsfn.ThreadsafeFunction[int, None] | None = None
    send: Callable[[int], object]
    if variant == "tsfn":
        fn = tsfn.ThreadsafeFunction(put)
        send = fn.call
    else:

        def send(stamp: int) -> None:
            loop.call_soon_threadsafe(put, stamp)

    before, after = variant == "raw, spin before", variant == "raw, spin after"

    def produce() -> None:
        sleep = time.sleep
        for _ in range(n):
            stamp = clock()
            if before:
                _spin()
            send(stamp)
            calls.append(clock() - stamp)
            if after:
                _spin()
            sleep(0.001)

    thread = threading.Thread(target=produce)
    thread.start()
    await asyncio.wait_for(done.wait(), timeout=n * 0.01 + 10)
    thread.join()
    if fn is not None:
        fn.release()
    return delays, calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._wakeup")
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", default="asyncio,uvloop")
    options = parser.parse_args(argv)
    loops = options.loops.split(",")
    samples: dict[tuple[str, str], tuple[list[int], list[int]]] = {
        (lp, v): ([], []) for lp in loops for v in VARIANTS
    }
    for _ in range(options.rounds):
        for lp in loops:
            for variant in VARIANTS:
                delays, calls = run_on(lp, functools.partial(_run, variant, options.n))
                samples[lp, variant][0].extend(delays)
                samples[lp, variant][1].extend(calls)
    print(f"spin: {_spin_ns() / 1000:.2f} us warm; {options.rounds} rounds of {options.n} items")
    print()
    print("| loop | method | p50 delay, us | x raw | producer part, us | loop part, us |")
    print("|---|---|---|---|---|---|")
    for lp in loops:
        raw = statistics.median(samples[lp, "raw"][0])
        for variant in VARIANTS:
            delays, calls = samples[lp, variant]
            # The loop's part per item: its delay minus its producer part.
            loop_parts = [d - c for d, c in zip(delays, calls, strict=True)]
            p50 = statistics.median(delays)
            print(
                f"| {lp} | {variant} | {p50 / 1000:.1f} | {p50 / raw:.2f} | "
                f"{statistics.median(calls) / 1000:.1f} | "
                f"{statistics.median(loop_parts) / 1000:.1f} |"
            )


if __name__ == "__main__":
    main()
