"""Every Python snippet in the documentation works.

The rule, for each fenced code block in ``docs/**/*.md`` and ``README.md``:

1. A ``python`` block made only of ``--8<-- "NAME.py"`` (or ``"NAME.py:section"``)
   lines includes an example file. The file (and section) must exist in examples/;
   tests/test_examples.py runs the file itself.
2. A ``python`` block whose first line starts with ``# fragment`` is a piece of a
   larger program (say, the body of a worker). It is compiled, not run.
3. A ``pycon`` block is an interactive session: its ``>>>`` examples run as a doctest.
4. Any other ``python`` block is a complete program. It runs in a subprocess (from a
   temporary directory, with this checkout on PYTHONPATH) and must exit with status
   0, without a traceback or warning on stderr. If the next block is a ``text`` block
   titled "Output" (```` ```text title="Output" ````), the program's output must be
   exactly that text.

Python code in any other kind of block (``py``, ``python3``, ``ipython``) fails the
test, so that no snippet escapes the rule.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(60)

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<attrs>.*)$"
)
INCLUDE = re.compile(r'^--8<--\s+"(?P<file>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')
FRAGMENT = "# fragment"
PYTHONISH = {"py", "python3", "py3", "ipython", "ipython3", "pyi"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    attrs: str
    code: str
    output: str | None = None  # the text of a following ```text title="Output" block

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        lines = [line for line in self.code.splitlines() if line.strip()]
        if self.lang == "pycon":
            return "doctest"
        if self.lang != "python":
            return "other"
        if lines and all(line.startswith("--8<--") for line in lines):
            return "include"
        if lines and lines[0].startswith(FRAGMENT):
            return "fragment"
        return "program"


def pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of `page`, with each block's Output block attached."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    last_end = -2  # line index just after the previous block
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].startswith(indent + fence[0] * 3)
            and lines[j].strip() == fence[0] * len(lines[j].strip())
            and len(lines[j].strip()) >= len(fence)
        ):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        block = Block(page, i + 1, opening["lang"], opening["attrs"], "\n".join(body) + "\n")
        previous = found[-1] if found else None
        between = lines[last_end:i] if previous else []
        if (
            previous is not None
            and block.lang == "text"
            and 'title="Output"' in block.attrs
            and all(not line.strip() for line in between)
        ):
            previous.output = block.code
        else:
            found.append(block)
        last_end = j + 1
        i = j + 1
    return found


ALL_BLOCKS = [block for page in pages() for block in blocks_of(page)]


def of_kind(*kinds: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.kind in kinds]


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-X", "dev", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_no_python_snippet_escapes_the_rule() -> None:
    stray = [f"{b.id} ({b.lang})" for b in ALL_BLOCKS if b.lang in PYTHONISH]
    assert not stray, "use ```python (or ```pycon for sessions): " + ", ".join(stray)
    outputs = [b.id for b in ALL_BLOCKS if b.lang == "text" and 'title="Output"' in b.attrs]
    assert not outputs, "an Output block must follow a program directly: " + ", ".join(outputs)


def test_the_rule_finds_the_snippets() -> None:
    """A parser that finds nothing would make every other test here pass vacuously."""
    kinds = {b.kind for b in ALL_BLOCKS}
    assert {"include", "program"} <= kinds
    assert sum(b.kind == "program" for b in ALL_BLOCKS) >= 10
    assert sum(b.output is not None for b in ALL_BLOCKS) >= 5


@pytest.mark.parametrize("block", of_kind("program"), ids=lambda b: b.id)
def test_program_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code, encoding="utf-8")
    done = run_python([str(script)], tmp_path)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"
    # -X dev turns on asyncio's debug mode, which may log a slow callback on a busy
    # machine; a traceback or a warning is a real problem.
    for marker in ("Traceback", "Warning", "was never", "Exception in"):
        assert marker not in done.stderr, f"{block.id} wrote to stderr:\n{done.stderr}"
    if block.output is not None:
        got = [line.rstrip() for line in done.stdout.rstrip("\n").splitlines()]
        expected = [line.rstrip() for line in block.output.rstrip("\n").splitlines()]
        assert got == expected, f"{block.id}: the output differs from the page"


@pytest.mark.parametrize("block", of_kind("fragment"), ids=lambda b: b.id)
def test_fragment_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("block", of_kind("doctest"), ids=lambda b: b.id)
def test_session_passes_as_a_doctest(block: Block, tmp_path: Path) -> None:
    assert ">>> " in block.code, f"{block.id}: a pycon block needs >>> prompts"
    session = tmp_path / "session.txt"
    session.write_text(block.code, encoding="utf-8")
    done = run_python(["-m", "doctest", str(session)], tmp_path)
    assert done.returncode == 0, f"{block.id} failed:\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("block", of_kind("include"), ids=lambda b: b.id)
def test_include_names_an_example_that_exists(block: Block) -> None:
    for line in block.code.strip().splitlines():
        include = INCLUDE.match(line.strip())
        assert include is not None, f"{block.id}: not an include: {line!r}"
        path = EXAMPLES / include["file"]
        assert path.is_file(), f"{block.id}: no such example: {path}"
        if include["section"]:
            text = path.read_text(encoding="utf-8")
            for edge in ("start", "end"):
                marker = f"# --8<-- [{edge}:{include['section']}]"
                assert marker in text, f"{block.id}: {path.name} has no {marker!r}"


def test_every_example_is_shown_in_the_docs() -> None:
    included = {
        m["file"]
        for b in of_kind("include")
        for m in map(INCLUDE.match, b.code.strip().splitlines())
        if m is not None
    }
    assert included == {p.name for p in EXAMPLES.glob("*.py")}


# Every Node-API function, mode and status, and every node-addon-api class, that
# issue 6 asks the mapping table to cover.
NODE_API_NAMES = [
    "napi_create_threadsafe_function",
    "napi_get_threadsafe_function_context",
    "napi_call_threadsafe_function",
    "napi_acquire_threadsafe_function",
    "napi_release_threadsafe_function",
    "napi_ref_threadsafe_function",
    "napi_unref_threadsafe_function",
    "napi_tsfn_blocking",
    "napi_tsfn_nonblocking",
    "napi_tsfn_release",
    "napi_tsfn_abort",
    "napi_ok",
    "napi_queue_full",
    "napi_closing",
    "napi_invalid_arg",
    "napi_would_deadlock",
    "napi_cancelled",
    "napi_generic_failure",
    "napi_create_async_work",
    "napi_delete_async_work",
    "napi_queue_async_work",
    "napi_cancel_async_work",
    "Napi::ThreadSafeFunction",
    "Napi::TypedThreadSafeFunction",
    "Napi::AsyncWorker",
    "Napi::AsyncProgressWorker",
    "Napi::AsyncProgressQueueWorker",
]


@pytest.mark.parametrize("name", NODE_API_NAMES)
def test_node_api_table_maps_the_name_to_tsfn_with_a_link(name: str) -> None:
    rows = [
        line
        for line in (DOCS / "node-api.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("|") and re.search(rf"`{re.escape(name)}`", line.split("|")[1])
    ]
    assert rows, f"no table row starts with `{name}`"
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) >= 3, f"too few cells in: {row}"
        assert all(cells[:2]), f"empty cell in: {row}"
        assert re.search(r"\]\(|\]\[", row), f"no link to the page that explains it: {row}"
