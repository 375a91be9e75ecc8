"""Every complete program in the docs type-checks as a user's program would.

tests/test_docs.py runs each complete program (a ``python`` block that is neither an
include nor a ``# fragment``); here each one is also checked by ``mypy --strict`` and
by pyright in strict mode, both for Python 3.10 (the oldest supported), against the
tsfn of this checkout. A reader who copies a program into a strictly typed project
gets no error from either checker.

Each checker runs once, over all the programs together (one file each), and each
test then looks up the errors in its own program's file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from _pyright import pyright
from test_docs import ROOT, Block, of_kind

pytestmark = pytest.mark.timeout(300)

PROGRAMS = of_kind("program")

# `{file name: [error, ...]}` for the programs written by `_write_programs`.
Errors = dict[str, list[str]]


def _file_name(block: Block) -> str:
    # A valid, unique module name per program: mypy checks them all as one build.
    return "doc_" + re.sub(r"\W", "_", block.id) + ".py"


def _write_programs(directory: Path) -> list[str]:
    names = []
    for block in PROGRAMS:
        (directory / _file_name(block)).write_text(block.code, encoding="utf-8")
        names.append(_file_name(block))
    return names


def _run_mypy(directory: Path, files: list[str]) -> Errors:
    env = dict(os.environ)
    env["MYPYPATH"] = str(ROOT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file=",  # the user's defaults, not this repository's config
            "--strict",
            "--python-version=3.10",
            "--show-error-codes",
            "--no-error-summary",
            "--cache-dir",
            str(directory / ".mypy_cache"),
            *files,
        ],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # 0: clean, 1: errors reported; 2 is mypy failing to run at all.
    assert done.returncode in (0, 1), f"mypy failed:\n{done.stdout}\n{done.stderr}"
    errors: Errors = {name: [] for name in files}
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(":")
        if name in errors and ": error:" in rest:
            errors[name].append(line)
    return errors


def _run_pyright(directory: Path, files: list[str]) -> Errors:
    config = {
        "typeCheckingMode": "strict",
        "pythonVersion": "3.10",
        "include": files,
        "extraPaths": [str(ROOT)],
    }
    (directory / "pyrightconfig.json").write_text(json.dumps(config), encoding="utf-8")
    report = pyright(cwd=directory)
    errors: Errors = {name: [] for name in files}
    for diagnostic in report["generalDiagnostics"]:
        if diagnostic["severity"] != "error":
            continue
        name = Path(diagnostic["file"]).name
        line = diagnostic["range"]["start"]["line"] + 1
        rule = diagnostic.get("rule", "")
        errors[name].append(f"{name}:{line}: {diagnostic['message']} [{rule}]")
    return errors


CHECKERS: dict[str, Callable[[Path, list[str]], Errors]] = {
    "mypy": _run_mypy,
    "pyright": _run_pyright,
}


@pytest.fixture(scope="module", params=sorted(CHECKERS))
def checked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Errors:
    """The errors one checker reports in each docs program."""
    directory = tmp_path_factory.mktemp(request.param)
    return CHECKERS[request.param](directory, _write_programs(directory))


def test_every_program_is_checked() -> None:
    """An empty parametrisation would make the test below pass vacuously."""
    assert len(PROGRAMS) >= 10


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in PROGRAMS])
def test_program_type_checks(block: Block, checked: Errors) -> None:
    errors = checked[_file_name(block)]
    assert not errors, f"{block.id}:\n" + "\n".join(errors)
