"""A headless Chromium, driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` makes Chromium read protocol messages from its file
descriptor 3 and write its own to descriptor 4, each one JSON text ended by a NUL
byte. That needs no WebSocket client and no port, so the standard library is enough:
this module starts the browser, opens one tab, and sends commands to it. Events
(what the protocol sends unasked) are kept, for the caller to inspect.

The browser is a real process: `close()` asks it to quit and then stops it by its
PID if it has not.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

# Flags for a browser that talks to nothing but the pages it is sent to.
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_chromium() -> str | None:
    """The Chromium executable on PATH (Debian's package installs `chromium`)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class ProtocolError(RuntimeError):
    """The browser answered a command with an error, or stopped answering."""


class Chromium:
    """One headless browser with one tab; `send` runs a DevTools command in that tab."""

    def __init__(self, executable: str, profile: Path, *, width: int, height: int) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # bash puts the pipe ends at descriptors 3 and 4, where Chromium looks for them,
        # then becomes Chromium (exec): the PID is the browser's own. (bash, because
        # dash only redirects descriptors below 10.)
        shell = f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}'
        self.log = profile / "chromium.log"
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    "bash",
                    "-c",
                    shell,
                    executable,
                    *FLAGS,
                    "--remote-debugging-pipe",
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                pass_fds=(to_browser_read, from_browser_write),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self._session: str | None = None
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            attached = self.send("Target.attachToTarget", targetId=target, flatten=True)
            self._session = attached["sessionId"]
            self.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.close()
            raise

    def send(self, method: str, *, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Run `method` (in the tab, once there is one); return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") != self._next_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise ProtocolError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result

    def navigate(self, url: str, *, timeout: float = 30.0) -> None:
        """Open `url` in the tab; return once its load event has fired.

        `events` then holds what the tab reported since the navigation began.
        """
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", timeout=timeout)

    def wait_for(self, method: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The first event named `method` in `events`, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for event in self.events[checked:]:
                if event.get("method") == method:
                    return event
            checked = len(self.events)
            self.events.append(self._receive(deadline, method))

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """The value of a JavaScript expression in the tab (awaited if it is a promise)."""
        result = self.send(
            "Runtime.evaluate",
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression[:80]!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        """Save what the tab shows (the whole page, not only the viewport) as a PNG."""
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        """Ask the browser to quit; stop it by PID if it has not within a few seconds."""
        self._session = None
        with contextlib.suppress(ProtocolError, OSError):  # it may be gone already
            self.send("Browser.close", timeout=5)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(remaining, 0))
            if not ready:
                raise ProtocolError(f"no answer to {waiting_for} in time; see {self.log}")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise ProtocolError(f"the browser exited during {waiting_for}; see {self.log}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed
