"""tsfn's public types, as a user's strictly checked program sees them.

A program written the way users write them is checked by ``mypy --strict`` and by
pyright in strict mode (the checkers of test_docs_types.py). Its ``assert_type``
lines state what each checker must infer, and each line marked ``# error`` must be
rejected, every other line accepted: a wrong type or a missed rejection fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_docs_types import CHECKERS

pytestmark = pytest.mark.timeout(300)

PROGRAM = """\
import asyncio
import concurrent.futures
from typing_extensions import assert_type

import tsfn


async def double(x: int) -> int:
    return x * 2


def triple(x: int) -> int:
    return x * 3


def to_text(loop: object, callback: object, context: object, data: bytes) -> str:
    return data.decode()


async def to_text_later(loop: object, callback: object, context: object, data: bytes) -> str:
    return data.decode()


def execute(fn: tsfn.ThreadsafeFunction[str]) -> str:
    fn.call("item")
    return "done"


async def main() -> None:
    # submit()'s future holds what the callback returns, awaited if it is awaitable.
    plain = tsfn.ThreadsafeFunction(triple)
    assert_type(plain, tsfn.ThreadsafeFunction[int, int])
    assert_type(plain.submit(1), concurrent.futures.Future[int])
    awaited = tsfn.ThreadsafeFunction(double)
    assert_type(awaited.submit(1), concurrent.futures.Future[int])
    # With call_js, it holds what call_js returns.
    assert_type(tsfn.ThreadsafeFunction(call_js=to_text), tsfn.ThreadsafeFunction[bytes, str])
    later = tsfn.ThreadsafeFunction(call_js=to_text_later)
    assert_type(later.submit(b"x"), concurrent.futures.Future[str])
    with plain.acquire() as same:
        assert_type(same, tsfn.ThreadsafeFunction[int, int])
    async with plain as again:
        assert_type(again, tsfn.ThreadsafeFunction[int, int])

    # A function that takes any object takes strings: ThreadsafeFunction[str] as written.
    printer: tsfn.ThreadsafeFunction[str] = tsfn.ThreadsafeFunction(print)
    work: tsfn.AsyncWork[tsfn.ThreadsafeFunction[str], str] = tsfn.AsyncWork(execute, data=printer)
    assert_type(await work, str)
    printer.call(3)  # error: an int where str items are declared

    tsfn.ThreadsafeFunction()  # error: neither callback nor call_js
    tsfn.ThreadsafeFunction(max_queue_size=4)  # error: neither callback nor call_js
    plain.call("one")  # error: the callback takes ints


asyncio.run(main())
"""


def _expected_error_lines() -> set[int]:
    return {n for n, line in enumerate(PROGRAM.splitlines(), 1) if "# error" in line}


@pytest.mark.parametrize("checker", sorted(CHECKERS))
def test_public_types_infer_and_reject_as_documented(checker: str, tmp_path: Path) -> None:
    (tmp_path / "user_program.py").write_text(PROGRAM, encoding="utf-8")
    errors = CHECKERS[checker](tmp_path, ["user_program.py"])["user_program.py"]
    # "user_program.py:LINE: ..." (mypy adds a column or not; pyright: see its runner)
    lines = {int(error.split(":")[1]) for error in errors}
    assert lines == _expected_error_lines(), "\n".join(errors)
