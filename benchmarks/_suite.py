"""The whole benchmark set: which cases exist, in which order they run, and the CLI.

Throughput cases run in interleaved rounds (every case once per round: A B C A B C
...) and report the median, so a slow spell of this noisy machine hits every method
alike. Before the rounds, one short warm-up run per case measures its rate and picks
its N so that one run takes about `--seconds` (between 1,000 and `--max-n` items):
the fastest methods get the most items, and anyio's round trips do not eat the
time budget. `--n` fixes N instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _cases, _memory, _node, _remote
from benchmarks._cases import Failed, run_on
from benchmarks._peers import Bridge, available, bridges
from benchmarks._report import FLOOR, NODE, TSFN, LatencyRow, MemoryRow, Results, Row, machine

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
PRODUCERS = (1, 4, 16)
BOUNDED = 64
NODE_PRODUCERS = (1, 4)
# Node's own rows vary the most from run to run (issue 15: 1.1x to 3.9x tsfn between
# runs), so its one-thread rows, and the asyncio tsfn rows they are compared with, get
# more interleaved rounds than the rest, as do the streams from other processes (one
# stream against the Queue relay moved from 2.8x to 3.6x between runs of 3 rounds);
# the other rows keep the shorter default.
NODE_ROUNDS = 5


@dataclass
class Options:
    rounds: int
    node_rounds: int  # rounds of Node's P=1 rows and of the tsfn rows compared with them
    seconds: float
    max_n: int
    n: int | None  # fixed N for every throughput case (no calibration)
    timeout: float
    latency_items: int
    load_items: int
    memory_n: tuple[int, int]
    only: list[str]
    skip: list[str]
    loops: list[str]


@dataclass
class RateCase:
    id: str
    row: Row
    run: Callable[[int], float | None]  # N -> seconds; None: hung (Node only)
    fixed_n: int | None = None
    seconds: float | None = None  # what one run should take, if not --seconds
    unavailable: str | None = None  # why it cannot run here (if not a bridge's reason)
    extra_rounds: bool = False  # runs `Options.node_rounds` rounds (see NODE_ROUNDS)


# Remote runs are longer than the in-process ones (their items come in batches, and
# the relays they are compared with are slow), but the whole set must stay short.
REMOTE_SECONDS = 1.0
REMOTE_STREAMS = (1, 4)


def _parse(argv: list[str] | None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="tsfn against its peers, in one run, with ratios.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny N, one round (smoke run)")
    parser.add_argument("--n", type=int, help="fixed N per throughput run (no calibration)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default 3)")
    parser.add_argument("--seconds", type=float, default=0.2, help="target time of one run")
    parser.add_argument("--max-n", type=int, default=200_000, help="largest N of a run")
    parser.add_argument(
        "--only", action="append", default=[], help="run case ids matching (glob, repeatable)"
    )
    parser.add_argument("--skip", action="append", default=[], help="skip case ids matching")
    parser.add_argument(
        "--loops", help="comma-separated: asyncio,uvloop,trio (default: those installed)"
    )
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="where results.md goes (default: benchmarks/)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    quick = args.quick
    loops = args.loops.split(",") if args.loops else _cases.loop_kinds()
    rounds = args.rounds or (1 if quick else 3)
    options = Options(
        rounds=rounds,
        node_rounds=rounds if quick else max(rounds, NODE_ROUNDS),
        seconds=args.seconds,
        max_n=args.max_n,
        n=args.n or (2000 if quick else None),
        timeout=10.0 if quick else 30.0,
        latency_items=20 if quick else 250,
        load_items=400 if quick else 4000,
        memory_n=(100, 1000) if quick else (500, 5000),
        only=args.only,
        skip=args.skip,
        loops=loops,
    )
    if args.list:
        for case in _rate_cases(options):
            print(case.id)
        for row_id, *_ in _latency_cases(options):
            print(row_id)
        for row_id, *_ in _memory_cases(options):
            print(row_id)
        sys.exit(0)
    return options, None if args.no_write else args.out


def _selected(options: Options, case_id: str) -> bool:
    def match(pattern: str) -> bool:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        return fnmatch.fnmatchcase(case_id, glob)

    if options.only and not any(match(p) for p in options.only):
        return False
    return not any(match(p) for p in options.skip)


def _queue_id(maxsize: int) -> str:
    return f"bounded{maxsize}" if maxsize else "unbounded"


def _throughput_run(
    loop: str, bridge: type[Bridge], producers: int, maxsize: int, timeout: float
) -> Callable[[int], float]:
    def run(n: int) -> float:
        return run_on(
            loop,
            lambda: _cases.throughput(
                bridge, n=n, producers=producers, maxsize=maxsize, timeout=timeout
            ),
        )

    return run


def _stream_run(
    loop: str, stream: Callable[[int, int, float], Awaitable[float]], timeout: float
) -> Callable[[int], float]:
    def run(n: int) -> float:
        return run_on(loop, lambda: stream(n, BOUNDED, timeout))

    return run


def _node_run(producers: int, maxsize: int, timeout: float) -> Callable[[int], float | None]:
    def run(n: int) -> float | None:
        try:
            return _node.run(n, producers, maxsize, timeout)
        except ValueError as exc:
            raise Failed(str(exc)) from None

    return run


def _rate_cases(options: Options) -> list[RateCase]:
    """Every items/s case, in table order: queue, producers, loop, method."""
    cases: list[RateCase] = []
    timeout = options.timeout
    for maxsize in (0, BOUNDED):
        for producers in PRODUCERS:
            for loop in options.loops:
                for name, bridge in bridges(loop).items():
                    cases.append(
                        RateCase(
                            f"throughput/{loop}/{name}/p{producers}/{_queue_id(maxsize)}",
                            Row("throughput", loop, name, producers, maxsize),
                            _throughput_run(loop, bridge, producers, maxsize, timeout),
                            extra_rounds=(loop, name, producers) == ("asyncio", TSFN, 1),
                        )
                    )
            if producers == 1 and maxsize == 0:
                row = Row("throughput", "-", FLOOR, 1, 0)
                n = options.n or options.max_n
                cases.append(RateCase("throughput/floor", row, _cases.floor, fixed_n=n))
            if producers in NODE_PRODUCERS:
                # Node gets the most items any Python method gets; a run that hangs is
                # cut off at 10x what a run of Node's own slowest case takes.
                row = Row("throughput", "-", NODE, producers, maxsize)
                case_id = f"throughput/node/p{producers}/{_queue_id(maxsize)}"
                run = _node_run(producers, maxsize, timeout=3.0)
                n = options.n or options.max_n
                extra = producers == 1  # the rows the targets compare; P=4 bounded hangs
                cases.append(RateCase(case_id, row, run, fixed_n=n, extra_rounds=extra))
    streams: list[tuple[str, Callable[[int, int, float], Awaitable[float]]]] = [
        (f"{TSFN}.stream", _cases.stream_tsfn),
        ("hand-written", _cases.stream_handwritten),
    ]
    # The hand-written pipeline is asyncio code (run_in_executor, asyncio.Queue).
    for loop in (kind for kind in options.loops if kind != "trio"):
        for method, stream in streams:
            cases.append(
                RateCase(
                    f"stream/{loop}/{method}",
                    Row("stream", loop, method, 1, BOUNDED),
                    _stream_run(loop, stream, timeout),
                )
            )
    for executor, methods in _remote.METHODS.items():
        for count in REMOTE_STREAMS:
            for method in methods:
                row = Row(executor, "asyncio", method, count, BOUNDED)
                cases.append(
                    RateCase(
                        f"remote/{executor.replace(' ', '-')}/{method}/s{count}",
                        row,
                        _remote_run(row, timeout * 4),
                        seconds=REMOTE_SECONDS,
                        unavailable=_remote.available(executor),
                        extra_rounds=True,
                    )
                )
    return cases


def _remote_run(row: Row, timeout: float) -> Callable[[int], float]:
    """N items per stream -> seconds for all; a timed round's p50 goes into the row."""

    def run(n: int) -> float:
        seconds, p50_ns = _remote.run(row.section, row.method, row.producers, n, timeout)
        if n == row.n:
            row.p50_us.append(p50_ns / 1e3)
        return seconds / row.producers  # so that the rate counts the items of all streams

    return run


def _unavailable(case: RateCase) -> str | None:
    """Why `case` cannot run on this machine, or None."""
    method = case.row.method
    if case.unavailable or case.row.section in _remote.METHODS:
        return case.unavailable
    if method in bridges(case.row.loop):
        return available(method)
    if method == f"{TSFN}.stream":
        why = available(TSFN)
        if why is None:
            import tsfn

            if not hasattr(tsfn, "stream"):
                why = "tsfn.stream does not exist yet"
        return why
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_rates(options: Options, results: Results) -> None:
    cases = [c for c in _rate_cases(options) if _selected(options, c.id)]
    results.rows += [c.row for c in cases]
    node_note = ""
    if any(c.row.method == NODE for c in cases):
        try:
            results.config["node"] = _node.build()
        except RuntimeError as exc:
            node_note = str(exc)
    runnable: list[RateCase] = []
    for case in cases:
        why = node_note if case.row.method == NODE else _unavailable(case)
        if why:
            case.row.note = why if why.startswith("skipped") else f"skipped: {why}"
        else:
            runnable.append(case)
    if not runnable:
        return
    _log(
        f"throughput: {len(runnable)} cases x {options.rounds} rounds "
        f"(Node's P=1 rows, the tsfn rows compared with them and the remote streams: "
        f"{options.node_rounds})"
    )
    for case in runnable:  # the warm-up round: one short run each, which picks N
        if case.fixed_n is not None:
            case.row.n = case.fixed_n
            continue
        if options.n is not None:
            case.row.n = options.n
            continue
        warm = max(1000, 50 * case.row.producers)
        seconds = _attempt(case, warm)
        if seconds:
            rate = warm / seconds
            target = case.seconds or options.seconds
            case.row.n = int(min(options.max_n, max(1000, rate * target)))
    for round_ in range(max(options.rounds, options.node_rounds)):
        started = time.perf_counter()
        for case in runnable:
            rounds = options.node_rounds if case.extra_rounds else options.rounds
            if case.row.failed or round_ >= rounds:
                continue
            seconds = _attempt(case, case.row.n)
            if seconds:
                case.row.rounds.append(case.row.n / seconds)
        _log(f"  round {round_ + 1}: {time.perf_counter() - started:.1f} s")
    for case in runnable:
        hung = case.row.note.count(_node.HANG)
        if hung:
            rounds = options.node_rounds if case.extra_rounds else options.rounds
            case.row.note = f"{_node.HANG} in {hung} of {rounds} runs"


def _attempt(case: RateCase, n: int) -> float | None:
    """One run; failures are written into the row (a hung Node run is only noted)."""
    try:
        seconds = case.run(n)
    except Failed as exc:
        case.row.failed = True
        case.row.note = str(exc)
        _log(f"  FAILED {case.id}: {exc}")
        return None
    if seconds is None:
        case.row.note += _node.HANG
        _log(f"  {case.id}: {_node.HANG}")
    return seconds


def _latency_cases(options: Options) -> list[tuple[str, LatencyRow]]:
    cases = []
    for load, producers, maxsize in (("idle", 1, 0), ("load", 4, BOUNDED)):
        for loop in options.loops:
            for name in bridges(loop):
                row = LatencyRow(loop, name, load, producers, maxsize)
                cases.append((f"latency/{loop}/{name}/{load}", row))
    return cases


def _run_latency(options: Options, results: Results) -> None:
    cases = [row for case_id, row in _latency_cases(options) if _selected(options, case_id)]
    results.latency += cases
    for row in cases:
        why = available(row.method)
        if why:
            row.note = f"skipped: {why}"
    runnable = [row for row in cases if not row.note]
    rounds = min(2, options.rounds)
    if runnable:
        _log(f"latency: {len(runnable)} cases x {rounds} rounds")
    for _ in range(rounds):
        for row in runnable:
            if row.failed:
                continue
            idle = row.load == "idle"
            n = options.latency_items if idle else options.load_items

            def main(row: LatencyRow = row, n: int = n, idle: bool = idle) -> Awaitable[list[int]]:
                return _cases.latency(
                    bridges(row.loop)[row.method],
                    n=n,
                    producers=row.producers,
                    maxsize=row.maxsize,
                    interval=0.001 if idle else 0.0,
                    timeout=options.timeout,
                )

            try:
                row.samples_ns += run_on(row.loop, main)
            except Failed as exc:
                row.failed, row.note = True, str(exc)
                _log(f"  FAILED latency {row.loop} {row.method} {row.load}: {exc}")


def _memory_cases(options: Options) -> list[tuple[str, MemoryRow]]:
    cases = []
    for loop in options.loops:
        settings = [(TSFN, 0)] + [(name, BOUNDED) for name in bridges(loop)]
        for method, maxsize in settings:
            for n in options.memory_n:
                row = MemoryRow(loop, method, maxsize, n)
                cases.append((f"memory/{loop}/{method}/{_queue_id(maxsize)}/n{n}", row))
    return cases


def _run_memory(options: Options, results: Results) -> None:
    cases = [row for case_id, row in _memory_cases(options) if _selected(options, case_id)]
    if not cases:
        return
    if sys.platform == "win32":
        results.skipped.append("memory: needs the resource module, which Windows lacks")
        return
    results.memory += cases
    _log(f"memory: {len(cases)} child processes")
    for row in cases:
        why = available(row.method)
        if why:
            row.note = f"skipped: {why}"
            continue
        try:
            data = _memory.measure(row.method, row.loop, row.maxsize, row.n, timeout=60)
        except Failed as exc:
            row.failed, row.note = True, str(exc)
            _log(f"  FAILED memory {row.loop} {row.method} N={row.n}: {exc}")
            continue
        row.base_kib, row.peak_kib = data["base_kib"], data["peak_kib"]
        row.seconds, row.producer_seconds = data["seconds"], data["producer_seconds"]


def main(argv: list[str] | None = None) -> int:
    options, out = _parse(argv)
    started = time.perf_counter()
    config = {
        "date": time.strftime("%Y-%m-%d"),
        "rounds": options.rounds,
        "node_rounds": options.node_rounds,
        "seconds_per_run": options.seconds,
        "max_n": options.max_n,
        "fixed_n": options.n,
        "loops": options.loops,
        "only": options.only,
        "skip": options.skip,
    }
    results = Results(machine(), config)
    try:
        _run_rates(options, results)
    finally:
        _remote.close()
    _run_latency(options, results)
    _run_memory(options, results)
    results.config["total_seconds"] = round(time.perf_counter() - started, 1)
    text = results.markdown()
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text, encoding="utf-8")
        _log(f"wrote {out / 'results.md'}")
    _log(f"total: {results.config['total_seconds']} s")
    failures = results.failures()
    for failure in failures:
        _log(f"FAILED: {failure}")
    return 1 if failures else 0
