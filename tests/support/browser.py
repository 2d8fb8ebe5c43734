"""Open a local HTML page in headless chromium, as a test sees it: a screenshot, the DOM after its scripts ran, and
every console error or failed resource load.

One chromium per page, driven over the DevTools protocol on ``--remote-debugging-pipe`` (the child's fd 3 reads
commands, fd 4 writes replies and events, each a JSON object ended by a NUL byte): standard library only, and the
screenshot, the DOM and the errors come from the same load of the page.

Errors collected: ``Runtime.exceptionThrown`` (uncaught exceptions), ``Runtime.consoleAPICalled`` of type error or
assert, ``Log.entryAdded`` of level error (chromium's own messages, e.g. "Failed to load resource"),
``Network.loadingFailed`` (a URL that cannot be fetched: here any http URL, the machine has no internet), and, once
loaded, every ``<img>`` that completed without an image (a data: URI that does not decode raises no console message).
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT_S = 60.0
WIDTH = 1280
HEIGHT = 6000  # the window: tall enough for a long page, so 100vh and lazy loading see it all
SETTLE_S = 0.2  # after the load event: timers and late loads still report

FLAGS = [
    "--headless",
    "--no-sandbox",  # root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    f"--window-size={WIDTH},{HEIGHT}",
    "--remote-debugging-pipe",
]

# Images the page finished loading without a picture: broken data: URIs, undecodable files.
BROKEN_IMAGES_JS = """
JSON.stringify(Array.from(document.images)
  .filter(img => img.complete && img.naturalWidth === 0 && img.getAttribute('src'))
  .map(img => img.currentSrc || img.src))
"""

# What chromium --dump-dom prints: the doctype, if any, then the document element, each on a line.
DOM_JS = """
(document.doctype ? new XMLSerializer().serializeToString(document.doctype) + '\\n' : '')
  + document.documentElement.outerHTML + '\\n'
"""


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or did not answer in time."""


@dataclass
class Page:
    screenshot: Path
    dom: str
    console_errors: list[str] = field(default_factory=list)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        raise BrowserError("chromium is not installed: install it: make browser")
    return path


def open_page(html: Path, out_dir: Path, timeout_s: float = TIMEOUT_S) -> Page:
    """Load ``html`` from its file:// URL in a fresh headless chromium; write ``out_dir/<stem>.png``."""
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile,
        _Chromium(chromium_path(), profile, timeout_s) as browser,
    ):
        return browser.load(html, out_dir / f"{html.stem}.png")


def _high_fd(fd: int) -> int:
    """The same pipe end at fd >= 10, so that moving it to 3 or 4 in the child clobbers nothing."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Chromium:
    def __init__(self, executable: str, profile: str, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        to_child_r, self.to_child = (_high_fd(fd) for fd in os.pipe())
        self.from_child, from_child_w = (_high_fd(fd) for fd in os.pipe())
        self.stderr = tempfile.TemporaryFile()
        # The child reads commands on fd 3 and writes answers on fd 4: bash moves the pipe ends there, then execs
        # chromium (dash takes fds 0-9 only; a preexec_fn would be unsafe with threads).
        move = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        try:
            self.process = subprocess.Popen(
                ["/bin/bash", "-c", move, executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                pass_fds=(to_child_r, from_child_w),
                start_new_session=True,  # its renderers and helpers go with it
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)

    def __enter__(self) -> _Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close", timeout_s=5)
                    self.process.wait(timeout=5)
                except (BrowserError, subprocess.TimeoutExpired, OSError):
                    pass
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # its helpers, or all of it after a timeout
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait()
            os.close(self.to_child)
            os.close(self.from_child)
            self.stderr.close()

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-2000:]

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer within {self.timeout_s:g} s\n{self._stderr_tail()}")
            ready, _, _ = select.select([self.from_child], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.from_child, 1 << 20)
            if not chunk:
                raise BrowserError(
                    f"chromium exited (status {self.process.poll()}) before answering\n{self._stderr_tail()}"
                )
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send a command and wait for its answer, keeping the events that arrive in between."""
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        try:
            os.write(self.to_child, json.dumps(command).encode() + b"\0")
        except BrokenPipeError:
            raise BrowserError(f"chromium exited (status {self.process.poll()})\n{self._stderr_tail()}") from None
        deadline = self.deadline if timeout_s is None else time.monotonic() + timeout_s
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str) -> None:
        """Read events until ``method`` arrives (it may already have)."""
        if any(event["method"] == method for event in self.events):
            return
        while True:
            message = self._read_message(self.deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return

    def drain(self, seconds: float) -> None:
        """Keep reading events for ``seconds`` (late timers, late loads)."""
        end = min(time.monotonic() + seconds, self.deadline)
        while True:
            left = end - time.monotonic()
            if left <= 0 or b"\0" not in self.buffer and not select.select([self.from_child], [], [], left)[0]:
                return
            message = self._read_message(self.deadline)
            if "method" in message:
                self.events.append(message)

    def load(self, html: Path, screenshot: Path) -> Page:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.events.clear()  # about:blank's
        navigated = self.send("Page.navigate", {"url": html.as_uri()}, session=session)
        if "errorText" in navigated:
            raise BrowserError(f"cannot open {html}: {navigated['errorText']}")
        self.wait_for("Page.loadEventFired")
        self.drain(SETTLE_S)
        broken = self.send(
            "Runtime.evaluate", {"expression": BROKEN_IMAGES_JS, "returnByValue": True}, session=session
        )["result"]["value"]
        dom = self.send("Runtime.evaluate", {"expression": DOM_JS, "returnByValue": True}, session=session)
        content = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": max(HEIGHT, math.ceil(content["height"])), "scale": 1}
        shot = self.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
            session=session,
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return Page(
            screenshot=screenshot,
            dom=dom["result"]["value"],
            console_errors=_errors(self.events, json.loads(broken)),
        )


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _where(details: dict[str, Any]) -> str:
    url = details.get("url")
    return f" ({url}:{details.get('lineNumber', 0) + 1})" if url else ""


def _errors(events: list[dict[str, Any]], broken_images: list[str]) -> list[str]:
    """One line per console error, exception or failed load, in the order chromium reported them; a URL that failed
    to load is named once, though both the Log and the Network domains report it."""
    requests: dict[str, str] = {}  # requestId -> URL, for Network.loadingFailed (which names none)
    errors = []
    failed: set[str] = set()
    logged = {
        event["params"]["entry"].get("url")
        for event in events
        if event["method"] == "Log.entryAdded" and event["params"]["entry"]["source"] == "network"
    }
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            requests[params["requestId"]] = params["request"]["url"]
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            exception = details.get("exception", {})
            text = exception.get("description") or details.get("text", "exception")
            errors.append(f"uncaught exception: {text.splitlines()[0]}{_where(details)}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = " ".join(
                str(arg["value"]) if "value" in arg else arg.get("description", arg.get("type", "?"))
                for arg in params.get("args", [])
            )
            errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            url = entry.get("url")
            if url and entry["source"] == "network":
                failed.add(url)
            errors.append(f"{entry['source']}: {entry['text']}" + (f" ({_short(url)})" if url else ""))
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = requests.get(params["requestId"], "?")
            if url not in logged:
                failed.add(url)
                errors.append(f"failed to load {_short(url)}: {params['errorText']}")
    errors += [f"broken image: {_short(src)}" for src in broken_images if src not in failed]
    return errors
