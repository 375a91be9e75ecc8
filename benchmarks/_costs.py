"""Where tsfn's time goes, per item: instruction counts, which a noisy machine repeats.

    python -m benchmarks._costs [--n N] [--loops asyncio,uvloop]

Each scenario runs in its own process under ``valgrind --tool=callgrind`` twice, with
N and 2N items; the difference of the two totals over N is the cost of one item
(start-up and imports cancel out). The scenarios run on one thread, so the counts
hold still, and the parts are their differences:

- ``loop``: ``for i in range(n): pass``; ``floor``: the same calling the benchmark's
  callback (`Sink.put`): callback = floor - loop.
- ``call``: n ``fn.call(i)`` on the loop thread, the wake token already taken (a
  drain is pending), then the process exits before any drain: call = call - loop.
- ``drain``: the same, then the drains deliver all n (batches of `BATCH`): drain per
  item = drain - call - callback.
- ``wake`` / ``raw``: n times one item, each on its own loop iteration (``fn.call(i)``
  or ``loop.call_soon_threadsafe(cb, i)``, then ``await asyncio.sleep(0)``): what one
  wake-up of one item costs tsfn (token, self-pipe, handle, drain set-up and settle)
  over raw's one callback is wake - raw.

The threaded figures beside them are timed, in this run: the floor, tsfn unbounded
with one producer thread (and how many items each wake-up carried there), and Node's
own `napi_threadsafe_function` from one C thread if Node is here (`benchmarks/_node.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import _cases, _node
from benchmarks._cases import Sink, run_on
from benchmarks._peers import bridges

__all__ = ["SCENARIOS", "child", "main", "per_item", "timed"]

SCENARIOS = ("loop", "floor", "call", "drain", "wake", "raw")


def child(scenario: str, loop_kind: str, n: int) -> None:
    """Run one scenario with `n` items, checking the sum; exit at once when done."""
    sink = Sink(n)
    put = sink.put
    if scenario == "loop":
        for _ in range(n):
            pass
        os._exit(0)
    if scenario == "floor":
        for i in range(n):
            put(i)
        sink.check()
        os._exit(0)

    async def main() -> None:
        import tsfn

        loop = asyncio.get_running_loop()
        fn: tsfn.ThreadsafeFunction[int] = tsfn.ThreadsafeFunction(put)
        call = fn.call
        if scenario in ("call", "drain"):
            done = loop.create_future()
            sink.finished = lambda: done.set_result(None)
            call(0)  # takes the wake token: the n-1 calls below find it taken
            for i in range(1, n):
                call(i)
            if scenario == "call":
                os._exit(0)  # before the drain: only the calls were counted
            await done
        else:
            send: Callable[[int], object] = call
            if scenario == "raw":
                soon = loop.call_soon_threadsafe

                def send(i: int) -> None:
                    soon(put, i)

            sleep = asyncio.sleep
            for i in range(n):
                send(i)
                await sleep(0)  # the wake-up's callback runs, then this task again
        sink.check()
        fn.release()
        os._exit(0)

    run_on(loop_kind, main)


def _instructions(scenario: str, loop_kind: str, n: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks._costs",
        "--child",
        scenario,
        loop_kind,
        str(n),
    ]
    # A fixed hash seed: dict and set layouts, and so the counts, repeat from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    found = re.search(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}")
    return int(found.group(1))


def per_item(scenario: str, loop_kind: str, n: int) -> float:
    """Instructions per item of `scenario`: Ir(2n) - Ir(n), over n."""
    return (_instructions(scenario, loop_kind, 2 * n) - _instructions(scenario, loop_kind, n)) / n


def timed(n: int, rounds: int, *, node: bool = True) -> dict[str, Any]:
    """Nanoseconds per item, medians of interleaved rounds: floor, tsfn P=1, Node P=1
    (if `node` and Node is here); and tsfn's items per drain."""
    import statistics

    from tsfn import _function

    wakes = [0]
    drain = _function.ThreadsafeFunction._drain

    def counted(self: Any) -> None:
        wakes[0] += 1
        drain(self)

    tsfn_bridge = bridges("asyncio")["tsfn"]
    version: str | None = None
    if node:
        with contextlib.suppress(RuntimeError):  # no Node here: its row is left out
            version = _node.build()
    times: dict[str, list[float]] = {"floor": [], "tsfn": [], "node": []}
    drains = 0
    for _ in range(rounds):
        times["floor"].append(_cases.floor(n) / n * 1e9)
        wakes[0] = 0
        _function.ThreadsafeFunction._drain = counted  # type: ignore[method-assign]
        try:

            def main() -> Any:
                return _cases.throughput(tsfn_bridge, n=n, producers=1, maxsize=0, timeout=60)

            times["tsfn"].append(run_on("asyncio", main) / n * 1e9)
        finally:
            _function.ThreadsafeFunction._drain = drain  # type: ignore[method-assign]
        drains += wakes[0]
        if version:
            seconds = _node.run(n, 1, 0, timeout=30)
            if seconds:
                times["node"].append(seconds / n * 1e9)
    out: dict[str, Any] = {k: statistics.median(v) for k, v in times.items() if v}
    out["items per drain"] = n * rounds / drains if drains else None
    out["node version"] = version
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._costs", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="items per counted run")
    parser.add_argument("--loops", default="asyncio,uvloop", help="loops for the wake-ups")
    parser.add_argument("--timed-n", type=int, default=200_000, help="items per timed run")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument(
        "--child", nargs=3, metavar=("SCENARIO", "LOOP", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        scenario, loop_kind, n = args.child
        child(scenario, loop_kind, int(n))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found: install it (apt-get install valgrind)", file=sys.stderr)
        return 1
    n = args.n
    loops = args.loops.split(",")
    ir = {s: per_item(s, "asyncio", n) for s in ("loop", "floor", "call", "drain")}
    callback = ir["floor"] - ir["loop"]
    call = ir["call"] - ir["loop"]
    drain = ir["drain"] - ir["call"] - callback
    print(f"instructions per item (callgrind, N={n} and {2 * n}), unbounded, asyncio:")
    print(f"  floor (loop + callback)       {ir['floor']:8.0f}")
    print(f"  callback (Sink.put)           {callback:8.0f}")
    print(f"  producer call (no wake-up)    {call:8.0f}")
    print(f"  drain, per item in a batch    {drain:8.0f}")
    print(f"  tsfn per item, batched        {call + drain + callback:8.0f}")
    for loop_kind in loops:
        wake, raw = per_item("wake", loop_kind, n), per_item("raw", loop_kind, n)
        print(f"one item per loop iteration, {loop_kind}:")
        print(f"  raw call_soon_threadsafe      {raw:8.0f}")
        print(f"  tsfn (call, wake, drain, settle) {wake:5.0f}  (+{wake - raw:.0f})")
    times = timed(args.timed_n, args.rounds)
    print(f"timed, ns per item (median of {args.rounds} rounds, N={args.timed_n}):")
    for key in ("floor", "tsfn", "node"):
        if key in times:
            print(f"  {key:28s}  {times[key]:8.1f}")
    if times["items per drain"]:
        print(f"  tsfn items per drain (P=1)    {times['items per drain']:8.0f}")
    if times["node version"]:
        print(f"  (Node {times['node version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
