"""The reference row: Node's own `napi_threadsafe_function`, the system tsfn mirrors.

`node_addon/addon.c` is compiled with the system C compiler against the npm package
`node-api-headers` (node-gyp would download Node's headers, which these machines
cannot), and `node_addon/driver.js` runs one case per process and prints JSON.
Each run has a timeout: with several blocking producers on a bounded queue Node
itself can lose a wake-up and hang for good (nodejs/node#58723); such a run is
reported as hung, not waited for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["HANG", "build", "run"]

ADDON_DIR = Path(__file__).resolve().parent / "node_addon"
HEADERS = ADDON_DIR / "node_modules" / "node-api-headers" / "include"
ADDON = ADDON_DIR / "build" / "addon.node"
HANG = "hung (nodejs/node#58723)"


def build() -> str:
    """Build the addon if needed; return node's version. Raise `RuntimeError(why)`
    with a message for the table when this machine cannot run the Node rows."""
    node, npm = shutil.which("node"), shutil.which("npm")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if not (node and npm and cc):
        missing = [name for name, path in (("node", node), ("npm", npm), ("cc", cc)) if not path]
        raise RuntimeError(f"skipped: {', '.join(missing)} not found on PATH")
    if not (HEADERS / "node_api.h").exists():
        _step(
            [npm, "install", "--no-package-lock", "--no-audit", "--no-fund"],
            "npm install node-api-headers failed",
            timeout=180,
        )
    source = ADDON_DIR / "addon.c"
    if not ADDON.exists() or ADDON.stat().st_mtime < source.stat().st_mtime:
        ADDON.parent.mkdir(exist_ok=True)
        # On Linux the napi_* symbols stay undefined in the .so and resolve from the
        # node binary when it loads the addon; macOS needs to be told to allow that.
        extra = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
        _step(
            [
                cc,
                "-shared",
                "-fPIC",
                "-O2",
                "-DNODE_GYP_MODULE_NAME=addon",
                "-I",
                str(HEADERS),
                str(source),
                "-o",
                str(ADDON),
                "-lpthread",
                *extra,
            ],
            "compiling the addon failed",
            timeout=120,
        )
    return _step([node, "--version"], "node --version failed", timeout=30).strip()


def _step(cmd: list[str], failure: str, *, timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, cwd=ADDON_DIR, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"skipped: {failure} ({exc})") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"skipped: {failure}: {last}")
    return proc.stdout


def run(n: int, threads: int, maxsize: int, timeout: float) -> float | None:
    """Seconds for Node to deliver 0..n-1 from `threads` C threads; None if it hung.

    Raises `ValueError` if the JS callback saw the wrong items.
    """
    node = shutil.which("node") or "node"
    cmd = [node, str(ADDON_DIR / "driver.js"), str(ADDON), str(n), str(threads), str(maxsize)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        raise ValueError(f"node exited with {proc.returncode}: {proc.stderr.strip()[-200:]}")
    result = json.loads(proc.stdout)
    if result["count"] != n or result["sum"] != n * (n - 1) // 2:
        raise ValueError(f"wrong result from node: {result}")
    return float(result["seconds"])
