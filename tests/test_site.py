"""The documentation site, as a reader sees it in a real browser.

The site is built from this checkout (`mkdocs build --strict`), served on 127.0.0.1,
and every page listed in its sitemap is opened in one headless Chromium at 1280 x 900
px, a common laptop screen. On every page:

- no code block is wider than its column (it would be clipped, with a scroll bar);
- no table is wider than its column, and no identifier in a table (`napi_...`,
  `tsfn.ThreadsafeFunction`) is broken across lines;
- nothing is fetched from another host: the site renders offline, behind a proxy, or
  from an archived copy;
- no text names a private module (`tsfn._function`): the API reference, like reprs
  and tracebacks, says `tsfn.ThreadsafeFunction`;
- every ```` ```mermaid ```` diagram of the page's source is drawn as an SVG (with its
  state names in it), and none is left as raw `stateDiagram-v2` text.

Chromium comes from Debian's `chromium` package, which `python3 dev.py test` installs
when it runs as root; where it is missing the test is skipped, saying why. A failing
page leaves a screenshot whose path the failure message gives.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _chromium import Chromium, find_chromium
from test_package import mkdocs_setting

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WIDTH, HEIGHT = 1280, 900

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        sys.version_info < (3, 11),
        reason="the site is built on Python 3.11+ only (see dev.py: the newest "
        "mkdocstrings and pymdown-extensions for 3.10 do not work together)",
    ),
]

# Runs in the page once it has loaded: waits (up to `timeout` ms) until the page's
# `expected` mermaid diagrams are drawn, then measures what a reader would see.
# material replaces each <pre class="mermaid"> by a <div class="mermaid"> holding
# the SVG in a closed shadow root; the test reads that SVG through the protocol.
MEASURE = r"""
async (expected, timeout) => {
  const start = Date.now();
  const drawn = () => document.querySelectorAll("div.mermaid").length;
  while (drawn() < expected && Date.now() - start < timeout) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const wider = (el) => el.scrollWidth > el.clientWidth + 1;
  const line = (el) => (el.textContent || "").split("\n")[0].slice(0, 100);
  return {
    drawn: drawn(),
    raw: [...document.querySelectorAll("pre.mermaid")].map(line),
    rawText: document.body.innerText.includes("stateDiagram-v2"),
    privateNames: [...new Set(document.body.innerText.match(/\btsfn\._[a-z]\w*/g) || [])],
    codeTooWide: [...document.querySelectorAll(".md-content pre > code")]
      .filter(wider)
      .map((el) => `${el.scrollWidth} px > ${el.clientWidth} px: ${line(el)}`),
    tablesTooWide: [...document.querySelectorAll(".md-content .md-typeset__scrollwrap")]
      .filter(wider)
      .map((el) => `${el.scrollWidth} px > ${el.clientWidth} px: ${line(el)}`),
    brokenNames: [...document.querySelectorAll(".md-content td code, .md-content th code")]
      .filter((el) => !/\s/.test(el.textContent) && el.getClientRects().length > 1)
      .map((el) => el.textContent),
    diagramHeights: [...document.querySelectorAll("div.mermaid")].map(
      (el) => el.getBoundingClientRect().height
    ),
  };
}
"""


def mermaid_diagrams(page: Path) -> list[str]:
    """The source text of each ```mermaid fence in a Markdown page."""
    return re.findall(r"^```mermaid\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)


def served_at(page: Path) -> str:
    """Where mkdocs serves a page of docs/, relative to the site's root ("", "howto/x/")."""
    path = page.relative_to(DOCS).with_suffix("")
    if path.name == "index":
        path = path.parent
    return "" if path == Path(".") else path.as_posix() + "/"


SOURCES = {served_at(page): page for page in DOCS.rglob("*.md")}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, f"mkdocs build failed:\n{done.stdout}\n{done.stderr}"
    return out


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    """The site, served over HTTP on 127.0.0.1 (a free port) for the duration."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="site-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium on PATH: `python3 dev.py test` installs Debian's as root")
    chromium = Chromium(executable, tmp_path_factory.mktemp("chromium"), width=WIDTH, height=HEIGHT)
    try:
        chromium.send("Page.enable")
        chromium.send("Network.enable")
        yield chromium
    finally:
        chromium.close()


def site_pages(site: Path) -> list[str]:
    """The pages the sitemap lists, as paths relative to the site's root."""
    namespace = {"s": "http://www.sitemaps.org/schemas/sitemap/0.9"}
    locs = [loc.text or "" for loc in ET.parse(site / "sitemap.xml").findall(".//s:loc", namespace)]
    site_url = mkdocs_setting("site_url")
    assert all(loc.startswith(site_url) for loc in locs), locs
    return [loc.removeprefix(site_url) for loc in locs]


def test_the_sitemap_lists_every_page(site: Path) -> None:
    assert sorted(site_pages(site)) == sorted(SOURCES)


def test_the_lifecycle_diagram_is_in_the_source() -> None:
    """The browser test below checks mermaid diagrams; there must be one to check."""
    (diagram,) = mermaid_diagrams(DOCS / "concepts.md")
    assert diagram.startswith("stateDiagram-v2")


def _svg_texts(browser: Chromium, index: int) -> list[str]:
    """The text inside the SVG of the page's `index`-th drawn diagram."""
    handle = browser.send(
        "Runtime.evaluate", expression=f'document.querySelectorAll("div.mermaid")[{index}]'
    )["result"]
    node = browser.send("DOM.describeNode", objectId=handle["objectId"], depth=-1, pierce=True)
    texts: list[str] = []
    svgs = 0

    def walk(n: dict[str, Any]) -> None:
        nonlocal svgs
        svgs += n.get("nodeName") == "svg"
        if n.get("nodeType") == 3:
            texts.append(n.get("nodeValue", "").strip())
        for child in [*n.get("shadowRoots", []), *n.get("children", [])]:
            walk(child)

    walk(node["node"])
    assert svgs >= 1, "the diagram holds no <svg>"
    return texts


def _problems(browser: Chromium, base_url: str, path: str) -> dict[str, Any]:
    """What is wrong with the page at `path`, as a reader would see it; {} if nothing."""
    browser.navigate(base_url + path)
    diagrams = mermaid_diagrams(SOURCES[path])
    seen = browser.evaluate(f"({MEASURE})({len(diagrams)}, 20000)")
    found = {
        key: seen[key]
        for key in ("raw", "codeTooWide", "tablesTooWide", "brokenNames", "privateNames")
        if seen[key]
    }
    if seen["rawText"]:
        found["rawText"] = "the page shows 'stateDiagram-v2' as text"
    if seen["drawn"] != len(diagrams):
        found["diagrams"] = f"{seen['drawn']} drawn, {len(diagrams)} in the source"
    else:
        for index, source in enumerate(diagrams):
            # A real drawing, not mermaid's "syntax error" picture: every state that
            # the source names is written in the SVG.
            missing = set(re.findall(r"^\s*(\w+) -->", source, re.M)) - set(
                _svg_texts(browser, index)
            )
            if missing or seen["diagramHeights"][index] < 50:
                found[f"diagram {index}"] = f"missing {missing}, {seen['diagramHeights']}"
    elsewhere = {
        event["params"]["request"]["url"]
        for event in browser.events
        if event.get("method") == "Network.requestWillBeSent"
        and not event["params"]["request"]["url"].startswith((base_url, "data:", "blob:"))
    }
    if elsewhere:
        found["fetched from elsewhere"] = sorted(elsewhere)
    return found


def test_every_page_renders_within_its_column_offline(
    site: Path, base_url: str, browser: Chromium, tmp_path: Path
) -> None:
    pages = site_pages(site)
    assert len(pages) >= 10
    problems: dict[str, Any] = {}
    for path in pages:
        found = _problems(browser, base_url, path)
        if found:
            name = path.strip("/").replace("/", "-") or "index"
            found["screenshot"] = str(browser.screenshot(tmp_path / f"{name}.png"))
            problems[path or "/"] = found
    assert not problems, "\n".join(f"{page}: {found}" for page, found in problems.items())
