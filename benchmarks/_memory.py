"""Peak memory of a run whose producer is far faster than its consumer.

RSS never shrinks inside a process, so each case runs in a fresh child:
``python -m benchmarks._memory METHOD LOOP MAXSIZE N`` prints one JSON line with the
child's peak RSS before and after the measured run. The child first runs the same
case with a few hundred items, so the baseline already holds the threads, the loop,
the imports and the allocator's warm pools; what the measured run adds on top is
what the queue holds.

The producer sends fresh 4 KiB `bytearray`s as fast as it can; the consumer spends
`SPIN` seconds of busy work on each one, a hundredfold or more what a producer
spends per item, so an unbounded queue grows towards N items while a bounded one
must stay at its size, whatever N is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._cases import Failed, Sink, Work, drive, run_on
from benchmarks._peers import Send, bridges

__all__ = ["ITEM_SIZE", "SPIN", "measure"]

ITEM_SIZE = 4096
SPIN = 100e-6  # the consumer's busy work per item, in seconds
WARM_UP = 300
_ROOT = Path(__file__).resolve().parent.parent


class SlowSink(Sink):
    """Counts bytes; spins `SPIN` per item so the queue in front of it fills up."""

    __slots__ = ()

    def put(self, item: bytearray) -> None:  # type: ignore[override]
        end = time.perf_counter() + SPIN
        while time.perf_counter() < end:
            pass
        self.total += len(item)
        self.count += 1
        if self.count == self.n:
            self.end = time.perf_counter()
            self.finished()

    def check(self) -> None:
        if self.count != self.n or self.total != self.n * ITEM_SIZE:
            raise Failed(f"wrong result: {self.count} items, {self.total} bytes")


def _payloads(count: int, sent: list[float]) -> Work:
    def work(send: Send) -> None:
        for _ in range(count):
            send(bytearray(ITEM_SIZE))
        sent.append(time.perf_counter())

    return work


def _peak_rss_kib() -> int:
    """This process's peak RSS. On Linux from /proc (VmHWM): `ru_maxrss` would report
    the parent's peak instead when that was larger, as Linux carries it over exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS counts bytes


def _child(method: str, loop: str, maxsize: int, n: int) -> dict[str, float]:
    bridge = bridges(loop)[method]

    async def once(count: int) -> tuple[float, float]:
        sent: list[float] = []
        start = time.perf_counter()
        seconds = await drive(
            bridge, SlowSink(count), [_payloads(count, sent)], maxsize=maxsize, timeout=60
        )
        return seconds, sent[0] - start

    run_on(loop, lambda: once(WARM_UP))
    base = _peak_rss_kib()
    seconds, producing = run_on(loop, lambda: once(n))
    return {
        "base_kib": base,
        "peak_kib": _peak_rss_kib(),
        "seconds": seconds,
        "producer_seconds": producing,
    }


def measure(method: str, loop: str, maxsize: int, n: int, timeout: float) -> dict[str, float]:
    """Run one case in a fresh interpreter; raise `Failed` if it fails or hangs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks._memory", method, loop, str(maxsize), str(n)]
    try:
        proc = subprocess.run(
            cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise Failed(f"hung: no result after {timeout:g} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Failed(f"child exited with {proc.returncode}: {last}")
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def main(argv: list[str]) -> None:
    method, loop, maxsize, n = argv
    print(json.dumps(_child(method, loop, int(maxsize), int(n))))


if __name__ == "__main__":
    main(sys.argv[1:])
