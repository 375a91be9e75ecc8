"""What a user gets from the package, before reading a line of its code.

- The public objects call themselves `tsfn.X` (reprs, tracebacks, pickles), not the
  private module that defines them.
- `python -m tsfn` runs the demo, and the demo is no part of the public API: pyright's
  `--verifytypes` sees exactly the names in `tsfn.__all__`, every one fully typed and
  documented.
- The wheel and sdist a release would upload (built here from this checkout) pass
  `twine check --strict`, carry the licence, publish no development tool as a
  dependency, and give the same addresses as the documentation site.
"""

from __future__ import annotations

import email
import email.message
import pickle
import re
import subprocess
import sys
import tarfile
import traceback
import zipfile
from pathlib import Path

import pytest
from _pyright import pyright

import tsfn

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def mkdocs_setting(name: str) -> str:
    """A top-level `name: value` of mkdocs.yml (which plain YAML loaders refuse to read)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    found = re.search(rf"^{name}: (\S+)$", text, re.MULTILINE)
    assert found is not None, f"mkdocs.yml sets no {name}"
    return found[1]


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", tsfn.__all__)
def test_public_object_says_it_is_tsfn_x(name: str) -> None:
    obj = getattr(tsfn, name)
    assert obj.__module__ == "tsfn"
    assert f"{obj.__module__}.{obj.__qualname__}" == f"tsfn.{name}"


def test_reprs_and_tracebacks_name_tsfn_not_a_private_module() -> None:
    assert repr(tsfn.Closing) == "<class 'tsfn.Closing'>"
    assert repr(tsfn.ThreadsafeFunction[int, str]) == "tsfn.ThreadsafeFunction[int, str]"
    try:
        raise tsfn.QueueFull("max_queue_size=1 is full")
    except tsfn.QueueFull as exc:
        last_line = traceback.format_exception(exc)[-1]
    assert last_line == "tsfn.QueueFull: max_queue_size=1 is full\n"


def test_public_objects_pickle_by_their_public_name() -> None:
    # A process pool or a Dask worker sends these back; the name in the pickle must
    # be one that a plain `import tsfn` provides.
    for obj in (tsfn.Status.OK, tsfn.Closing("closed")):
        data = pickle.dumps(obj)
        assert b"tsfn._" not in data
        assert repr(pickle.loads(data)) == repr(obj)


# -- the demo --------------------------------------------------------------------------


def test_python_m_tsfn_runs_the_demo() -> None:
    pattern = r"\bdef \w+\(self"
    root = ROOT / "tsfn"
    expected = sum(
        1
        for path in root.rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(pattern, line)
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-m", "tsfn", pattern, "--root", str(root), "--show", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"\n{expected} hits for {pattern!r} in " in done.stdout, done.stdout


def test_pyright_sees_exactly_the_public_api_fully_typed(tmp_path: Path) -> None:
    report = pyright("--verifytypes", "tsfn", "--ignoreexternal", cwd=tmp_path)
    completeness = report["typeCompleteness"]
    assert completeness["packageRootDirectory"] == str(ROOT / "tsfn"), "checked another tsfn"
    exported = {s["name"] for s in completeness["symbols"] if s["isExported"]}
    # tsfn.__main__ is listed as a module (pyright lists every module whose name does
    # not start with one underscore) but exports nothing: the demo is in tsfn._demo.
    assert exported == {f"tsfn.{name}" for name in tsfn.__all__}
    problems = [(s["name"], s["diagnostics"]) for s in completeness["symbols"] if s["diagnostics"]]
    assert not problems
    assert completeness["completenessScore"] == 1
    assert completeness["missingFunctionDocStringCount"] == 0
    assert completeness["missingClassDocStringCount"] == 0
    assert report["summary"]["errorCount"] == report["summary"]["warningCount"] == 0


# -- the wheel and the sdist -----------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it, as `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend comes from the dev group already installed,
    # so the test needs no download and takes seconds.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, f"build failed:\n{done.stdout}\n{done.stderr}"
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("tsfn-*.whl")
    return wheel


def _sdist(dist: Path) -> Path:
    (sdist,) = dist.glob("tsfn-*.tar.gz")
    return sdist


def _wheel_metadata(dist: Path) -> email.message.Message:
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(wheel.read(name))


def test_wheel_and_sdist_pass_twine_check_strict(dist: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(_wheel(dist)), str(_sdist(dist))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_wheel_and_sdist_carry_the_license(dist: Path) -> None:
    license_text = (ROOT / "LICENSE").read_bytes()
    metadata = _wheel_metadata(dist)
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert wheel.read(name) == license_text
    with tarfile.open(_sdist(dist)) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        pkg_info = sdist.extractfile(f"{top}/PKG-INFO")
        licence = sdist.extractfile(f"{top}/LICENSE")
        assert pkg_info is not None
        assert licence is not None
        assert email.message_from_bytes(pkg_info.read()).get_all("License-File") == ["LICENSE"]
        assert licence.read() == license_text


def test_metadata_names_the_maintainers_and_no_development_tool(dist: Path) -> None:
    metadata = _wheel_metadata(dist)
    assert metadata["Author"] == metadata["Maintainer"] == "The tsfn developers"
    # At run time tsfn needs typing_extensions alone; the other dependencies are the
    # extras: Dask's, and the examples'. The test, lint, benchmark and docs tools are
    # dependency groups, never published.
    requires = metadata.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert [r.partition(">")[0] for r in runtime] == ["typing-extensions"], requires
    extras = {r.rpartition("extra == ")[2] for r in requires if r not in runtime}
    assert extras == {"'dask'", "'examples'"}
    assert metadata.get_all("Provides-Extra") == ["dask", "examples"]


def test_project_urls_agree_with_the_site(dist: Path) -> None:
    urls = {}
    for entry in _wheel_metadata(dist).get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        urls[label.strip()] = url.strip()
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    site_url, repo_url = mkdocs_setting("site_url"), mkdocs_setting("repo_url")
    assert urls["Documentation"] == urls["Homepage"] == site_url
    assert urls["Source"] == repo_url
    assert urls["Issues"] == repo_url + "/issues"
    assert urls["Changelog"] == site_url + "changelog/"
