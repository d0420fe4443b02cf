"""The report page in a real browser: headless Chromium over the DevTools protocol.

Opens index.html from disk (offline: no server, no network), waits for the load event, then
asks the page for every image's decoded size and collects console errors, uncaught exceptions
and failed loads. Needs Debian's `chromium` (.ci/run installs it) and `websocket-client`
(the `test` extra): a small, dependency-free WebSocket client for the protocol's socket.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with a DevTools WebSocket to its first page."""

    def __init__(self, profile: Path):
        try:
            import websocket  # websocket-client
        except ImportError:
            pytest.fail("websocket-client is missing: pip install -e '.[test]'")

        self.port = _free_port()
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}",
             "--remote-allow-origins=*", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        ws_url = None
        while time.time() < deadline and ws_url is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
            except OSError:
                time.sleep(0.2)
        if ws_url is None:
            self.close()
            raise RuntimeError("chromium's DevTools endpoint did not come up in 60 s")
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        """Call a protocol method and return its result, keeping events that arrive meanwhile."""
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        """The next event named `method` (or one already received)."""
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def open_page(path: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Load `path`; return what the page says about itself and every error seen."""
    b = Browser(tmp / "profile")
    try:
        b.send("Runtime.enable")
        b.send("Log.enable")
        b.send("Page.enable")
        b.send("Page.navigate", url=path.resolve().as_uri())
        b.wait_for("Page.loadEventFired")
        time.sleep(0.5)  # let late console messages arrive
        res = b.send("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            title: document.title,
            images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                     w: i.naturalWidth, h: i.naturalHeight, data: i.src.startsWith('data:image/png;base64,')})),
            tables: document.querySelectorAll('table').length,
            headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
            external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') ||
                     e.getAttribute('href')).filter(u => /^(https?:)?\\/\\//.test(u)),
            scripts: document.scripts.length})""")
        info = json.loads(res["result"]["value"])
        b.send("Runtime.evaluate", expression="0")  # flush pending events
        errors = []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                errors.append(f"console.{p['type']}: {p.get('args')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                errors.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return info, errors
    finally:
        b.close()


def test_report_page_loads_renders_every_image_without_errors(published_report, tmp_path):
    out, _ = published_report
    info, errors = open_page(out / "index.html", tmp_path)
    assert errors == []
    assert info["title"] == "PSA report"
    assert len(info["images"]) == 12
    for img in info["images"]:
        assert img["complete"] and img["data"], img
        assert img["w"] > 500 and img["h"] > 300, img  # decoded, not a broken-image icon
    assert info["tables"] >= 9 and info["external"] == [] and info["scripts"] == 0
    assert info["headings"][:2] == ["Overview", "Regimes"]


def test_compare_page_loads_without_errors(published_compare, tmp_path):
    info, errors = open_page(published_compare[0] / "index.html", tmp_path)
    assert errors == []
    assert len(info["images"]) == 2 and all(i["w"] > 500 for i in info["images"])
    assert info["headings"][0] == "Verdict"


def test_the_checks_catch_a_broken_page(tmp_path):
    # the checks themselves: a corrupt image and a console error must both show
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
                    '<img alt="x" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==">'
                    '<script>console.error("boom"); undefined_function();</script></body></html>')
    info, errors = open_page(page, tmp_path)
    assert info["images"][0]["w"] == 0
    assert any("console.error" in e and "boom" in e for e in errors)
    assert any(e.startswith("exception:") for e in errors)
