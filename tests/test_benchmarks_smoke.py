"""The benchmarks, run with tiny N so they never rot: every method delivers exactly the
items sent (the sums are checked, never the speed), a wrong sum or a hang fails a
run instead of passing quietly, and `python -m benchmarks` writes its tables."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _cases, _costs, _memory, _node, _remote, _suite, _wakeup
from benchmarks._cases import Failed, run_on
from benchmarks._peers import BRIDGES, Bridge, RawBridge, Send, bridges

LOOPS = _cases.loop_kinds()
# The stream pair is asyncio code (run_in_executor, asyncio.Queue): not run on trio.
ASYNCIO_LOOPS = [loop for loop in LOOPS if loop != "trio"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("maxsize", [0, 4], ids=["unbounded", "bounded4"])
def test_every_bridge_delivers_the_exact_sum(loop: str, maxsize: int) -> None:
    # A bound of 4 with 4 producers keeps every bounded bridge's producers blocking.
    for bridge in bridges(loop).values():
        for producers in (1, 4):

            async def main(bridge: type[Bridge] = bridge, producers: int = producers) -> float:
                return await _cases.throughput(
                    bridge, n=300, producers=producers, maxsize=maxsize, timeout=10
                )

            assert run_on(loop, main) > 0  # throughput() raised if the sum was wrong


class _WrongItem(RawBridge):
    """Delivers 1 in place of 0: the right count, the wrong sum."""

    def sender(self) -> Send:
        send = super().sender()
        return lambda item: send(item or 1)


class _Silent(RawBridge):
    """Accepts every item and delivers none: the run can only hang."""

    def sender(self) -> Send:
        return lambda item: None


@pytest.mark.timeout(10)
def test_a_wrong_sum_fails_the_run() -> None:
    async def main() -> float:
        return await _cases.throughput(_WrongItem, n=100, producers=2, maxsize=0, timeout=5)

    with pytest.raises(Failed, match="wrong result"):
        run_on("asyncio", main)


@pytest.mark.timeout(10)
def test_a_run_that_never_finishes_fails_after_its_timeout() -> None:
    async def main() -> float:
        return await _cases.throughput(_Silent, n=100, producers=2, maxsize=0, timeout=0.2)

    with pytest.raises(Failed, match="hung: 0 of 100"):
        run_on("asyncio", main)


@pytest.mark.timeout(10)
def test_floor_checks_its_sum() -> None:
    assert _cases.floor(1000) > 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("loop", ASYNCIO_LOOPS)
def test_stream_and_hand_written_pipeline_carry_every_item(loop: str) -> None:
    assert run_on(loop, lambda: _cases.stream_tsfn(500, 8, 10)) > 0
    assert run_on(loop, lambda: _cases.stream_handwritten(500, 8, 10)) > 0


@pytest.mark.timeout(15)
@pytest.mark.parametrize("loop", LOOPS)
def test_latency_gives_one_sample_per_item(loop: str) -> None:
    samples = run_on(
        loop,
        lambda: _cases.latency(
            BRIDGES["tsfn"], n=30, producers=3, maxsize=4, interval=0.0, timeout=10
        ),
    )
    assert len(samples) == 30
    assert all(s > 0 for s in samples)


@pytest.mark.timeout(20)
def test_memory_child_reports_its_peak_rss() -> None:
    result = _memory.measure("tsfn", "asyncio", 16, 200, timeout=15)
    assert result["peak_kib"] >= result["base_kib"] > 0


@pytest.mark.timeout(30)
def test_node_reference_row_when_node_is_here() -> None:
    if not (shutil.which("node") and shutil.which("npm") and shutil.which("cc")):
        pytest.skip("node, npm or cc is not installed: the benchmarks skip Node's row too")
    try:
        _node.build()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # One producer: the multi-producer bounded case can hang in Node itself (#58723).
    assert _node.run(2000, 1, 0, timeout=10)
    assert _node.run(2000, 1, 16, timeout=10)


@pytest.mark.timeout(30)
def test_the_command_writes_the_tables(tmp_path: Path) -> None:
    argv = ["--quick", "--n", "500", "--only", "throughput/asyncio/*/p1/*", "--only", "floor"]
    argv += ["--only", "latency/asyncio/tsfn/*", "--only", "latency/asyncio/call_soon*"]
    assert _suite.main([*argv, "--out", str(tmp_path)]) == 0  # 1 if a run failed
    text = (tmp_path / "results.md").read_text()
    assert "FAILED" not in text
    rates = _throughput_rates(text)
    assert ("asyncio", "tsfn", "unbounded") in rates
    assert ("asyncio", "tsfn", "bounded 64") in rates
    assert ("-", "floor", "unbounded") in rates
    assert all(rate.endswith((" k", " M")) for rate in rates.values()), rates


def _throughput_rates(results_md: str) -> dict[tuple[str, str, str], str]:
    """The items/s column of the throughput table, by (loop, method, queue)."""
    table = results_md.split("### Throughput", 1)[1].split("\n### ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    rows = [
        cells
        for cells in rows
        if len(cells) == 8 and cells[0] in ("asyncio", "uvloop", "trio", "-")
    ]
    return {(cells[0], cells[1].strip("*"), cells[3]): cells[4] for cells in rows}


@pytest.mark.timeout(30)
def test_trio_rows_take_their_ratios_from_run_sync_soon(tmp_path: Path) -> None:
    if "trio" not in LOOPS:
        pytest.skip("trio is not installed: the benchmarks skip its rows too")
    argv = ["--quick", "--n", "500", "--only", "throughput/trio/*/p1/*"]
    assert _suite.main([*argv, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    rates = _throughput_rates(text)
    methods = {method for loop, method, _queue in rates if loop == "trio"}
    assert methods == {"tsfn", "run_sync_soon", "anyio", "memory_channel"}
    # The raw base on trio is run_sync_soon itself: its own rows read 1.00x.
    rows = [row for row in text.splitlines() if row.startswith("| trio | run_sync_soon |")]
    assert rows
    assert all(row.split("|")[6].strip() == "1.00\N{MULTIPLICATION SIGN}" for row in rows)
    assert "P=1 unbounded: tsfn / run_sync_soon >= 5" in text
    assert "P=1 bounded 64: tsfn / memory_channel >= 2" in text


@pytest.mark.timeout(90)
def test_streams_from_other_processes_carry_every_item() -> None:
    executors = [e for e in _remote.METHODS if _remote.available(e) is None]
    try:
        for executor in executors:
            for method in _remote.METHODS[executor]:
                seconds, p50_ns = _remote.run(executor, method, 2, 300, timeout=60)
                assert seconds > 0  # run() raised if an item was missing
                assert p50_ns > 0
    finally:
        _remote.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", _costs.SCENARIOS)
def test_cost_scenarios_run_and_check_their_sums(scenario: str) -> None:
    # What `python -m benchmarks._costs` counts under callgrind, here without it: each
    # scenario exits at once, so each runs in a process of its own.
    for loop in ("asyncio", "uvloop") if scenario in ("wake", "raw") else ("asyncio",):
        if loop == "uvloop" and "uvloop" not in LOOPS:
            continue
        cmd = [sys.executable, "-m", "benchmarks._costs", "--child", scenario, loop, "500"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(30)
def test_cost_timings_count_the_drains() -> None:
    times = _costs.timed(2000, 1, node=False)
    assert times["floor"] > 0
    assert times["tsfn"] > 0
    assert times["items per drain"] >= 1


def test_targets_hold_issue_15s_rows() -> None:
    from benchmarks._report import NODE, RAW, TSFN, LatencyRow, Results, Row

    def row(loop: str, method: str, producers: int, maxsize: int, rate: float) -> Row:
        return Row("throughput", loop, method, producers, maxsize, rounds=[rate])

    results = Results({}, {})
    results.rows += [row("asyncio", TSFN, 1, 64, 900.0), row("-", NODE, 1, 64, 600.0)]
    results.rows.append(row("asyncio", TSFN, 1, 0, 2000.0))  # and no aiologic row
    results.rows += [row("asyncio", TSFN, p, 64, rate) for p, rate in ((4, 700.0), (16, 600.0))]
    results.latency += [
        LatencyRow("asyncio", TSFN, "idle", 1, 0, samples_ns=[30_000] * 100),
        LatencyRow("asyncio", RAW, "idle", 1, 0, samples_ns=[20_000] * 100),
    ]
    found = {t["target"]: (t["measured"], t["status"]) for t in results.targets()}
    assert found["P=1 bounded 64: tsfn / Node's own >= 1"] == (1.5, "met")
    assert found["bounded 64: tsfn P=4 / P=1 >= 0.8"][1] == "MISSED"  # 0.78
    assert found["bounded 64: tsfn P=16 / P=1 >= 0.7"][1] == "MISSED"  # 0.67
    assert found["p50 at 1 item/ms: tsfn / call_soon_threadsafe <= 1.2"] == (1.5, "MISSED")
    assert found["p99 at 1 item/ms: tsfn / call_soon_threadsafe"] == (1.5, "reported")
    assert found["P=1 unbounded: tsfn / aiologic >= 1.5"] == (None, "not measured")


def test_node_rows_get_five_rounds_unless_quick() -> None:
    options, _out = _suite._parse(["--no-write"])
    assert (options.rounds, options.node_rounds) == (3, 5)
    options, _out = _suite._parse(["--quick", "--no-write"])
    assert (options.rounds, options.node_rounds) == (1, 1)
    cases = {case.id: case for case in _suite._rate_cases(options)}
    assert cases["throughput/node/p1/bounded64"].extra_rounds
    assert cases["throughput/asyncio/tsfn/p1/bounded64"].extra_rounds
    assert not cases["throughput/asyncio/tsfn/p4/bounded64"].extra_rounds
    assert not cases["throughput/node/p4/bounded64"].extra_rounds


def test_the_wakeup_split_prints_a_row_per_method(capsys: pytest.CaptureFixture[str]) -> None:
    _wakeup.main(["--n", "20", "--rounds", "1", "--loops", "asyncio"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| asyncio")]
    assert [row.split(" | ")[1] for row in rows] == list(_wakeup.VARIANTS)
    # Every column a number, the delay from a stamp to its callback positive. (The
    # loop's part has no sign to check: on a loaded machine the callback can run
    # before the producer thread, preempted, notes that its call returned.)
    for row in rows:
        p50, *_ = (float(column) for column in row.rstrip(" |").split(" | ")[2:])
        assert p50 > 0
