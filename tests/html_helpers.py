"""Reading report.html back: tag balance, tables, images (tests/test_report_html.py)."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
DATA_PNG = "data:image/png;base64,"


class Page(HTMLParser):
    """Every start tag, the open-tag stack's mismatches, the images and each table's cell texts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tables: list[list[list[str]]] = []  # in document order (an outer table before its inner ones)
        self.h2: list[str] = []
        self._stack: list[str] = []
        self._open: list[list[list[str]]] = []  # the tables being read, innermost last
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None
        self.feed(text)
        self.close()
        if self._stack:
            self.errors.append(f"never closed: {self._stack}")

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})
        if tag in VOID:
            return
        self._stack.append(tag)
        if tag == "table":
            self._open.append([])
            self.tables.append(self._open[-1])
        elif tag == "tr" and self._open:
            self._open[-1].append([])
        elif tag in ("td", "th") and self._open:
            self._cell = []
        elif tag == "h2":
            self._heading = []

    def handle_startendtag(self, tag, attrs):
        self.errors.append(f"self-closing <{tag}/> (not HTML5 style)")

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag of void element </{tag}>")
            return
        if not self._stack or self._stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self._stack[-1] if self._stack else 'nothing'}")
            return
        self._stack.pop()
        if tag == "table":
            self._open.pop()
        elif tag in ("td", "th") and self._open and self._cell is not None:
            self._open[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h2" and self._heading is not None:
            self.h2.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)


def image_bytes(image: dict[str, str]) -> bytes:
    """The PNG an <img> embeds; fails unless its src is a base64 PNG data URI."""
    src = image.get("src", "")
    assert src.startswith(DATA_PNG), src[:80]
    data = base64.b64decode(src[len(DATA_PNG) :], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown table's lines (the rule line left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


# -- a real browser: Chromium driven over the DevTools protocol on a pipe (no websocket library) --------
CHECK_PAGE = """JSON.stringify({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  tables: document.querySelectorAll('table').length,
  first_table_rows: document.querySelector('table') ? document.querySelector('table').rows.length : 0,
  first_table_width: document.querySelector('table') ? document.querySelector('table').offsetWidth : 0,
  title: document.title,
})"""


def _high(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """Chromium started with ``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 / 4."""

    def __init__(self, chromium: str, profile: str, timeout: float = 60.0):
        self.timeout = timeout
        # Ends numbered 10 and up, so that the shell's moves to fds 3 and 4 never overwrite one of them.
        to_browser_r, self._write = (_high(fd) for fd in os.pipe())
        self._read, from_browser_w = (_high(fd) for fd in os.pipe())
        args = [
            "--headless",
            "--no-sandbox",  # tests may run as root, which Chromium's sandbox refuses
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # Chromium reads commands on fd 3 and writes replies on fd 4: bash puts the pipe ends there.
        shell = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, chromium, *args],  # dash refuses fd numbers above 9
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # it may have gone already
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def open_in_chromium(chromium: str, path, profile: str, screenshot=None) -> tuple[dict, list[str]]:
    """Load ``path`` in headless Chromium: what :data:`CHECK_PAGE` reports, and every console error,
    uncaught exception and blocked load (a CSP violation is logged as an error)."""
    tools = DevTools(chromium, profile)
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable", session=session)
        tools.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired")
        result = tools.send(
            "Runtime.evaluate", {"expression": CHECK_PAGE, "returnByValue": True}, session=session
        )
        if screenshot is not None:
            shot = tools.send("Page.captureScreenshot", {"captureBeyondViewport": True}, session=session)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        page = json.loads(result["result"]["value"])
    finally:
        tools.close()
    return page, _errors(tools.events)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            out.append(f"log: {params['entry'].get('text')}")
    return out
