"""Results of one benchmark run: the rows, the targets, and their markdown.

The markdown is written to benchmarks/results.md, the one committed copy of the
results, which docs/benchmarks.md includes.

Ratios are only taken between rows of the same run (these are noisy 2-core machines:
absolute numbers drift from run to run, ratios taken side by side hold). ``xraw`` is
a row's rate over `call_soon_threadsafe`'s in the same loop, producer count and queue
(bounded: `call_soon_threadsafe` behind a semaphore; on trio, `run_sync_soon`'s);
``xtsfn`` over tsfn's. Rows with no loop of their own (the floor, Node) are compared
with the asyncio loop's.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks._peers import describe

__all__ = ["LatencyRow", "MemoryRow", "Results", "Row", "machine"]

RAW, TSFN, FLOOR, NODE = "call_soon_threadsafe", "tsfn", "floor", "napi_threadsafe_function"
TIMES = "\N{MULTIPLICATION SIGN}"  # the tables' ratio sign
BOUNDED = 64
# Remote rows: their section, and the methods tsfn is compared with there.
REMOTE = {"process pool": ("Manager relay", "Queue relay"), "Dask": ("distributed.Queue",)}
PEERS = ("janus", "culsans", "aiologic", "anyio", "uvloop", "trio", "psutil")
TRIO_RAW, CHANNEL = "run_sync_soon", "memory_channel"


def _raw(loop: str) -> str:
    """The loop's own per-item "call this from a thread", the ``xraw`` base."""
    return TRIO_RAW if loop == "trio" else RAW


def _queue(maxsize: int) -> str:
    return f"bounded {maxsize}" if maxsize else "unbounded"


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} k"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}{TIMES}" if value >= 10 else f"{value:.2f}{TIMES}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


@dataclass
class Row:
    """Items per second of one method in one setting, one value per round."""

    section: str  # "throughput", "stream", or a remote executor: "process pool", "Dask"
    loop: str  # "asyncio", "uvloop", or "-" for the floor and Node
    method: str
    producers: int
    maxsize: int  # 0: unbounded
    n: int = 0
    rounds: list[float] = field(default_factory=list)
    note: str = ""  # why there is no number, or what went wrong in some rounds
    failed: bool = False  # a wrong result or a hang of a Python method: fails the run
    p50_us: list[float] = field(default_factory=list)  # per round (remote rows only)

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rounds) if self.rounds else None

    @property
    def p50(self) -> float | None:
        return statistics.median(self.p50_us) if self.p50_us else None


@dataclass
class LatencyRow:
    loop: str
    method: str
    load: str  # "idle" (one item per ms) or "load"
    producers: int
    maxsize: int
    samples_ns: list[int] = field(default_factory=list)
    note: str = ""
    failed: bool = False

    def percentile(self, q: float) -> float | None:
        if not self.samples_ns:
            return None
        ordered = sorted(self.samples_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3  # µs


@dataclass
class MemoryRow:
    loop: str
    method: str
    maxsize: int
    n: int
    base_kib: float = 0
    peak_kib: float = 0
    seconds: float = 0
    producer_seconds: float = 0
    note: str = ""
    failed: bool = False

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.base_kib) / 1024


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in PEERS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "platform": platform.platform(),
        "packages": versions,
    }


@dataclass
class Results:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # sections not run, and why

    def failures(self) -> list[str]:
        rows: list[Row | LatencyRow | MemoryRow] = [*self.rows, *self.latency, *self.memory]
        return [f"{r.loop} {r.method}: {r.note}" for r in rows if r.failed]

    def find(
        self, section: str, loop: str, method: str, producers: int, maxsize: int
    ) -> float | None:
        for row in self.rows:
            if (row.section, row.loop, row.method, row.producers, row.maxsize) == (
                section,
                loop,
                method,
                producers,
                maxsize,
            ):
                return row.rate
        return None

    def _vs(self, row: Row, method: str) -> float | None:
        loop = row.loop if row.loop != "-" else "asyncio"
        base = self.find(row.section, loop, method, row.producers, row.maxsize)
        return row.rate / base if row.rate and base else None

    # -- markdown ----------------------------------------------------------------------

    def markdown(self) -> str:
        # Headings at level 3: docs/benchmarks.md includes this under its own section.
        parts = [
            self._header(),
            "### Throughput: N items from P producer threads to a callback on the loop",
            self._throughput_table(),
            "Median of the rounds' items/s. Bounded runs use blocking producers. "
            "Methods (`cb` is the per-item callback; `x` the item):\n",
            self._legend(),
        ]
        if any(r.section == "stream" for r in self.rows):
            parts += ["### `tsfn.stream` versus a hand-written pipeline", self._stream_table()]
        if any(r.section in REMOTE for r in self.rows):
            parts += ["### Streams from other processes: a process pool, Dask", self._remote()]
        if self.latency:
            parts += ["### Latency: from just before the call to the callback", self._latency()]
        if self.memory:
            parts += ["### Memory: a producer far faster than its consumer", self._memory()]
        parts += ["### Targets (issues 4, 11, 12 and 15)", self._targets_table()]
        if self.skipped:
            parts += ["### Not run", "\n".join(f"- {why}" for why in self.skipped)]
        if self.failures():
            parts += ["### FAILED", "\n".join(f"- {why}" for why in self.failures())]
        return "\n\n".join(parts) + "\n"

    def _header(self) -> str:
        m, c = self.machine, self.config
        packages = ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
        node = f"; Node {c['node']}" if c.get("node") else ""
        gil = "" if m.get("gil", True) else ", free-threaded"
        more = c.get("node_rounds", c.get("rounds"))
        extra = (
            f" ({more} for the P=1 rows of Node and of asyncio's tsfn, and the streams "
            "from other processes)"
            if more != c.get("rounds")
            else ""
        )
        took = f"; the whole run took {c['total_seconds']} s" if "total_seconds" in c else ""
        return (
            f"Measured on {c.get('date', '?')}: {m.get('cpu')}, {m.get('cores')} cores, "
            f"{m.get('python')}{gil}, {m.get('platform')}; {packages}{node}. "
            f"Median of {c.get('rounds')} interleaved rounds{extra}{took}."
        )

    def _throughput_table(self) -> str:
        lines = []
        for row in self.rows:
            if row.section != "throughput":
                continue
            note = ("FAILED: " if row.failed else "") + row.note
            lines.append(
                [
                    row.loop,
                    f"**{row.method}**" if row.method == TSFN else row.method,
                    str(row.producers),
                    _queue(row.maxsize),
                    _rate(row.rate),
                    _ratio(self._vs(row, _raw(row.loop))),
                    _ratio(self._vs(row, TSFN)),
                    note,
                ]
            )
        header = ["loop", "method", "P", "queue", "items/s", f"{TIMES}raw", f"{TIMES}tsfn", "note"]
        return _table(header, lines)

    def _legend(self) -> str:
        methods = list(dict.fromkeys(r.method for r in self.rows if r.section == "throughput"))
        lines = []
        for method in methods:
            if method == FLOOR:
                lines.append(
                    "- floor: the same per-item callback called in a plain `for` loop on "
                    "one thread: no threads, no loop (the best any bridge could do)"
                )
            elif method == NODE:
                lines.append(
                    "- napi_threadsafe_function: Node's own, from C threads to a JS callback "
                    "(`benchmarks/node_addon`), blocking calls; ratios against asyncio's rows"
                )
            else:
                lines.append(
                    f"- {method}: `{describe(method, 0)}`; bounded `{describe(method, 64)}`"
                )
        return "\n".join(lines)

    def _stream_table(self) -> str:
        lines = []
        for row in self.rows:
            if row.section != "stream":
                continue
            base = self.find("stream", row.loop, "hand-written", 1, row.maxsize)
            ratio = row.rate / base if row.rate and base else None
            note = ("FAILED: " if row.failed else "") + row.note
            lines.append([row.loop, row.method, _rate(row.rate), _ratio(ratio), note])
        header = ["loop", "method", "items/s", f"{TIMES}hand-written", "note"]
        text = _table(header, lines)
        return text + (
            "\n\nBoth carry 0..N-1 from a worker in the default executor to an `async for` "
            "with at most 64 items in flight: `tsfn.stream(func, max_queue_size=64)`, "
            "and `call_soon_threadsafe(queue.put_nowait, x)` behind a `Semaphore(64)` "
            "that the consumer releases, ended by a sentinel."
        )

    def _remote(self) -> str:
        bases = [base for group in REMOTE.values() for base in group]
        lines = []
        for row in self.rows:
            if row.section not in REMOTE:
                continue
            ratios = [
                _ratio(self._vs(row, base)) if base in REMOTE[row.section] else "" for base in bases
            ]
            note = ("FAILED: " if row.failed else "") + row.note
            p50 = row.p50
            lines.append(
                [
                    row.section,
                    f"**{row.method}**" if row.method == TSFN else row.method,
                    str(row.producers),
                    _rate(row.rate),
                    f"{p50:.0f}" if p50 is not None else "—",
                    *ratios,
                    note,
                ]
            )
        header = ["executor", "method", "streams", "items/s", "p50 µs"]
        header += [f"{TIMES}{base}" for base in bases] + ["note"]
        if not any(line[-1] for line in lines):  # the page's column is narrow
            header.pop()
            lines = [line[:-1] for line in lines]
        from benchmarks._remote import DASK_BATCH

        return _table(header, lines) + (
            "\n\nS jobs each send N `perf_counter_ns()` stamps to one `async for` (tsfn) or "
            "callback (the relays) on the loop, at most 64 in flight per hop; items/s counts "
            "all streams, p50 is the median delay from the stamp to its arrival. tsfn: "
            "`tsfn.stream(func, executor=pool or client)`. Manager relay: the former "
            "process-pool how-to (a `Manager().Queue(100)` and a relay thread calling a "
            "ThreadsafeFunction of 64). Queue relay: the same with a `multiprocessing.Queue` "
            "given to the pool's initializer. distributed.Queue: the Dask jobs `put` "
            f"batches of {DASK_BATCH} into a `distributed.Queue` of 4 batches, relayed the "
            "same way. Each method and stream count keeps its pool, started before its "
            "first run; one Dask LocalCluster (2 processes, 2 threads each) for all runs."
        )

    def _latency(self) -> str:
        lines = []
        for row in self.latency:
            raw = next(
                (
                    r
                    for r in self.latency
                    if (r.loop, r.load, r.method) == (row.loop, row.load, _raw(row.loop))
                ),
                None,
            )
            p50, raw50 = row.percentile(0.5), raw.percentile(0.5) if raw else None
            what = (
                "1 producer, 1 item/ms, unbounded"
                if row.load == "idle"
                else f"{row.producers} producers flooding, {_queue(row.maxsize)}"
            )
            note = ("FAILED: " if row.failed else "") + row.note
            lines.append(
                [
                    row.loop,
                    row.method,
                    what,
                    f"{p50:.0f}" if p50 is not None else "—",
                    f"{row.percentile(0.99):.0f}" if row.samples_ns else "—",
                    _ratio(p50 / raw50 if p50 and raw50 else None),
                    str(len(row.samples_ns)),
                    note,
                ]
            )
        header = [
            "loop",
            "method",
            "load",
            "p50 µs",
            "p99 µs",
            f"p50 {TIMES}raw",
            "samples",
            "note",
        ]
        return _table(header, lines) + (
            "\n\nEach item is a `perf_counter_ns()` stamp taken just before the call; the "
            "callback subtracts it from its own. Under load the stamp is also taken "
            "before the call, so time spent blocked waiting for room counts."
        )

    def _memory(self) -> str:
        lines = []
        for row in self.memory:
            note = ("FAILED: " if row.failed else "") + row.note
            speed = (
                f"{row.seconds / row.producer_seconds:.0f}{TIMES}"
                if row.producer_seconds and not row.maxsize
                else "—"
            )
            lines.append(
                [
                    row.loop,
                    row.method,
                    _queue(row.maxsize),
                    str(row.n),
                    f"{row.peak_kib / 1024:.1f}" if row.peak_kib else "—",
                    f"{row.growth_mib:+.2f}" if row.peak_kib else "—",
                    speed,
                    note,
                ]
            )
        header = ["loop", "method", "queue", "N", "peak RSS MiB", "growth MiB", "slowdown", "note"]
        from benchmarks._memory import ITEM_SIZE, SPIN

        return _table(header, lines) + (
            f"\n\nOne fresh process per row. The producer sends new {ITEM_SIZE}-byte "
            f"`bytearray`s as fast as it can; the consumer busy-waits {SPIN * 1e6:.0f} µs "
            "per item. Growth is peak RSS after the run minus peak RSS after a warm-up "
            "run of the same case; a bounded queue's growth must not follow N. "
            "Slowdown (unbounded rows): how much longer the consumer took than the producer."
        )

    # -- targets -----------------------------------------------------------------------

    def targets(self) -> list[dict[str, Any]]:
        """The issue's targets, per loop: what was measured, and whether it was met.

        A ratio to raw `call_soon_threadsafe` that would put tsfn above the floor (no
        bridge can beat a plain `for` loop) is marked unreachable: on uvloop, whose
        own `call_soon_threadsafe` already coalesces wake-ups, 10x it is. Rows marked
        "aim" are directions, not pass/fail; "extra" rows are not in the issue; a
        ``=`` row (p99) is only reported.
        """
        out: list[dict[str, Any]] = []
        floor = self.find("throughput", "-", FLOOR, 1, 0)
        node = self.find("throughput", "-", NODE, 1, 0)
        node_bounded = self.find("throughput", "-", NODE, 1, BOUNDED)
        for loop in dict.fromkeys(r.loop for r in self.rows if r.loop != "-"):

            def rate(method: str, producers: int, maxsize: int, loop: str = loop) -> float | None:
                return self.find("throughput", loop, method, producers, maxsize)

            t1, t1b, b = rate(TSFN, 1, 0), rate(TSFN, 1, BOUNDED), BOUNDED
            idle_rows = [r for r in self.latency if r.loop == loop and r.load == "idle"]
            idle = {r.method: r.percentile(0.5) for r in idle_rows}
            idle99 = {r.method: r.percentile(0.99) for r in idle_rows}
            idle99_raw = idle99.get(_raw(loop))
            # (target, value, divided by, need, sense); a divisor of 1: value is absolute,
            # a missing one (None): not measured.
            Spec = tuple[str, float | None, float | None, float, str]
            trio = loop == "trio"
            specs: list[Spec] = (
                [  # issue 11
                    ("P=1 unbounded: tsfn / run_sync_soon", t1, rate(TRIO_RAW, 1, 0), 5, ">="),
                    ("P=1 bounded 64: tsfn / memory_channel", t1b, rate(CHANNEL, 1, b), 2, ">="),
                ]
                if trio
                else [  # issue 4, then issue 15 (bounded: Node's own, culsans on asyncio)
                    ("P=1 unbounded: tsfn / call_soon_threadsafe", t1, rate(RAW, 1, 0), 10, ">="),
                    ("P=1 unbounded: tsfn / aiologic", t1, rate("aiologic", 1, 0), 1.5, ">="),
                    ("P=1 bounded 64: tsfn / call_soon_threadsafe", t1b, rate(RAW, 1, b), 4, ">="),
                    *(
                        [
                            ("P=1 bounded 64: tsfn / Node's own", t1b, node_bounded, 1, ">="),
                            ("P=1 bounded 64: tsfn / culsans", t1b, rate("culsans", 1, b), 3, ">="),
                        ]
                        if loop == "asyncio"
                        else [
                            ("P=1 bounded 64: tsfn / culsans", t1b, rate("culsans", 1, b), 2, ">=")
                        ]
                    ),
                ]
            )
            raw_idle = idle.get(_raw(loop))
            specs += [
                ("unbounded: tsfn P=16 / P=1", rate(TSFN, 16, 0), t1, 0.7, ">="),
                ("bounded 64: tsfn P=16 / P=1", rate(TSFN, 16, b), t1b, 0.7, ">="),
                ("extra: unbounded: tsfn P=4 / P=1", rate(TSFN, 4, 0), t1, 0.7, ">="),
                (
                    f"{'extra: ' if trio else ''}bounded 64: tsfn P=4 / P=1",
                    rate(TSFN, 4, b),
                    t1b,
                    0.7 if trio else 0.8,
                    ">=",
                ),
                (f"p50 at 1 item/ms: tsfn / {_raw(loop)}", idle.get(TSFN), raw_idle, 1.2, "<="),
                (f"p99 at 1 item/ms: tsfn / {_raw(loop)}", idle99.get(TSFN), idle99_raw, 0, "="),
                ("aim: P=1 unbounded: tsfn / Node's own", t1, node, 1, ">="),
                ("aim: P=1 unbounded: tsfn / floor", t1, floor, 0.5, ">="),
            ]
            growth = sorted(
                (r for r in self.memory if r.loop == loop and r.method == TSFN and r.maxsize),
                key=lambda r: r.n,
            )
            if len(growth) >= 2 and all(r.peak_kib for r in growth):
                small, large = growth[0], growth[-1]
                grew = large.growth_mib - small.growth_mib
                target = f"bounded 64: RSS growth, N={large.n} minus N={small.n}, MiB"
                specs.append((target, grew, 1, 1.0, "<="))
            specs += self._remote_specs(loop)
            for target, value, divisor, need, sense in specs:
                measured = value / divisor if value is not None and divisor else None
                out.append(self._judge(loop, target, measured, need, sense, divisor, floor))
        return out

    def _remote_specs(self, loop: str) -> list[tuple[str, float | None, float | None, float, str]]:
        def rate(section: str, method: str, streams: int) -> float | None:
            return self.find(section, loop, method, streams, BOUNDED)

        specs: list[tuple[str, float | None, float | None, float, str]] = []
        for streams in (1, 4):
            tsfn_pool, tsfn_dask = rate("process pool", TSFN, streams), rate("Dask", TSFN, streams)
            specs += [
                (
                    f"process pool, {streams} streams: tsfn / Manager relay",
                    tsfn_pool,
                    rate("process pool", "Manager relay", streams),
                    20,
                    ">=",
                ),
                (
                    f"process pool, {streams} streams: tsfn / Queue relay",
                    tsfn_pool,
                    rate("process pool", "Queue relay", streams),
                    3,
                    ">=",
                ),
                (
                    f"Dask, {streams} streams: tsfn / distributed.Queue batched",
                    tsfn_dask,
                    rate("Dask", "distributed.Queue", streams),
                    3,
                    ">=",
                ),
            ]
        return [spec for spec in specs if spec[1] is not None or spec[2] is not None]

    @staticmethod
    def _judge(
        loop: str,
        target: str,
        measured: float | None,
        need: float,
        sense: str,
        base: float | None,
        floor: float | None,
    ) -> dict[str, Any]:
        if measured is None:
            status = "not measured"
        elif sense == "=":
            status = "reported"
        elif (measured >= need) if sense == ">=" else (measured <= need):
            status = "aim reached" if target.startswith("aim") else "met"
        elif target.startswith("aim"):
            status = "aim not reached"
        elif f"/ {_raw(loop)}" in target and base and floor and base * need > floor:
            status = "unreachable (above the floor)"
        else:
            status = "MISSED"
        return {
            "loop": loop,
            "target": target if sense == "=" else f"{target} {sense} {need:g}",
            "measured": measured,
            "need": need,
            "status": status,
        }

    def _targets_table(self) -> str:
        lines = []
        for t in self.targets():
            value = t["measured"]
            shown = "—" if value is None else f"{value:.2f}"
            lines.append([t["loop"], t["target"], shown, t["status"]])
        return _table(["loop", "target", "measured", "status"], lines)
