"""Developer commands for tsfn; needs nothing but python3 (>= 3.10).

    python3 dev.py demo     run the demo (python -m tsfn), no install needed
    python3 dev.py test     make .venv, install everything, run ruff, mypy, docs, pytest
    python3 dev.py bench    run the benchmarks (writes benchmarks/results.md)
    python3 dev.py soak     run the long memory/soak tests
    python3 dev.py docs     build the documentation site into site/

`--python PATH` picks the interpreter for the virtual environment (default: the one
running this script); each interpreter gets its own `.venv-X.Y`, so CI can test
several Python versions side by side. Extra arguments after `--` go to pytest or
to the benchmark runner.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# What every command's venv gets: tsfn itself (editable), the extras its examples and
# the Dask tests need, and every development tool (pyproject.toml's PEP 735 `dev` group).
INSTALL = ("-e", ".[examples,dask]", "--group", "dev")


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def _venv(python: str) -> Path:
    """Create (once) and update the virtual environment for `python`; return its python."""
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    venv = ROOT / f".venv-{version}"
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    venv_python = bin_dir / "python"
    if not venv_python.exists():
        _run(python, "-m", "venv", venv)
        _run(venv_python, "-m", "pip", "install", "-q", "--upgrade", "pip")
    # `--group` needs pip 25.1; this is a no-op (and offline) once pip is that new.
    _run(venv_python, "-m", "pip", "install", "-q", "pip>=25.1")
    _run(venv_python, "-m", "pip", "install", "-q", *INSTALL)
    return venv_python


# Programs the tests run for real, by Debian package: a headless Chromium looks at the
# site (tests/test_site.py), and the MQTT recipe talks to a real broker
# (tests/test_recipes.py). Installed when missing, where apt-get and root are at hand
# (CI's fresh machines); elsewhere the tests that need them are skipped, saying why.
SYSTEM_PACKAGES = {"chromium": ("chromium", "chromium-browser"), "mosquitto": ("mosquitto",)}
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def _system_packages() -> None:
    missing = [
        pkg
        for pkg, commands in SYSTEM_PACKAGES.items()
        if not any(shutil.which(cmd, path=SBIN) for cmd in commands)
    ]
    if not missing:
        return
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        print(f"not installing {' '.join(missing)} (needs apt-get as root): their tests skip")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    for cmd in (["apt-get", "update", "-qq"], install):
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            print(f"could not install {' '.join(missing)}: their tests skip", flush=True)
            return


def _test(python: Path, pytest_args: list[str]) -> None:
    _run(python, "-m", "ruff", "check", ".")
    _run(python, "-m", "ruff", "format", "--check", ".")
    _run(python, "-m", "mypy")
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material's banner
    if python.parent.parent.name == ".venv-3.10":
        # The docs do not depend on the interpreter, and the last mkdocstrings and
        # pymdown-extensions releases pip picks for 3.10 do not work together.
        print("docs: built on Python 3.11+ only", flush=True)
    else:
        _run(python, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", ROOT / "site")
    _system_packages()
    # Development mode (-X dev: resource warnings, debug hooks) and asyncio's debug
    # mode (thread checks in call_soon, slow-callback logs) catch misuse early.
    os.environ["PYTHONASYNCIODEBUG"] = "1"
    _run(python, "-X", "dev", "-m", "pytest", "-m", "not soak", *pytest_args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["demo", "test", "bench", "soak", "docs"])
    parser.add_argument("--python", default=sys.executable, help="interpreter for the venv")
    # Everything after `--` (or not ours) goes to pytest or the benchmark runner.
    args, rest = parser.parse_known_args()
    rest = [a for a in rest if a != "--"]
    try:
        if args.command == "demo":
            # The demo needs only the standard library: run it from the source tree.
            _run(args.python, "-m", "tsfn", *rest)
            return
        python = _venv(args.python)
        if args.command == "test":
            _test(python, rest)
        elif args.command == "bench":
            _run(python, "-m", "benchmarks", *rest)
        elif args.command == "soak":
            _run(python, "-m", "pytest", "-m", "soak", "--timeout=600", *rest)
        else:
            _run(python, "-m", "mkdocs", "build", "--strict", "--site-dir", ROOT / "site")
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
