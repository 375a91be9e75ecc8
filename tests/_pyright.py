"""Run pyright (from the `pyright` package of the lint group) and return its JSON report.

pyright finds the packages to check against through the `python` first on PATH, so
this puts the running interpreter's directory first: the test then checks against
the venv it runs in, whichever way pytest was started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def pyright(*args: str, cwd: Path) -> dict[str, Any]:
    """`pyright --outputjson ARGS` in `cwd`; its parsed report (exit status 0 or 1)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)  # the venv alone decides what `import tsfn` finds
    done = subprocess.run(
        [sys.executable, "-m", "pyright", "--outputjson", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # 0: no errors, 1: errors reported; anything else is pyright failing to run.
    assert done.returncode in (0, 1), f"pyright failed:\n{done.stdout}\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    return report
