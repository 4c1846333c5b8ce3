"""Headless Chromium (software WebGL) for the viewer test, driven over the DevTools protocol.

:func:`check_viewer` opens a page from ``file://`` with the fragment ``#selftest`` (the viewer's
script then toggles its first label layer and writes a JSON verdict into ``.niivue-selftest``),
and returns the console errors, uncaught exceptions and that verdict. The DevTools websocket is
spoken with tornado (installed with Jupyter), so no new dependency is needed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

EXECUTABLES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless=new", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
         "--disable-gpu-sandbox", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--window-size=1200,900", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    for name in EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    return None


def check_viewer(html_file: str | Path, timeout: float = 90.0, executable: str | None = None,
                 screenshot: str | Path | None = None) -> dict:
    """Load ``html_file`` headless with ``#selftest``; return what the page did.

    Keys: ``console_errors`` (console.error messages, log entries of level error, uncaught
    exceptions), ``selftest`` (the viewers' JSON verdicts, one per viewer), ``nonblank`` and
    ``differs`` (all viewers), ``messages`` (the viewers' fallback messages shown, if any).
    With ``screenshot``, a PNG of the viewport is written there.
    """
    exe = executable or find_chromium()
    if exe is None:
        raise RuntimeError("no chromium found (run scripts/install_browser.sh)")
    return asyncio.run(_check(exe, Path(html_file).resolve(), timeout, screenshot))


async def _check(exe: str, page: Path, timeout: float, screenshot=None) -> dict:
    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    with tempfile.TemporaryDirectory(prefix="spinemets-chromium-") as profile:
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            port = _devtools_port(proc, profile, timeout=30)
            client = AsyncHTTPClient()
            targets = json.loads((await client.fetch(f"http://127.0.0.1:{port}/json/list")).body)
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            ws = await websocket_connect(ws_url, max_message_size=64 * 1024 * 1024)
            session = _Session(ws)
            await session.call("Runtime.enable")
            await session.call("Log.enable")
            await session.call("Page.enable")
            await session.call("Page.navigate", url=page.as_uri() + "#selftest")
            deadline = time.monotonic() + timeout
            result: dict = {}
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                value = await session.evaluate(
                    "(function(){var v=document.querySelectorAll('.niivue-viewer');"
                    "var s=[].map.call(document.querySelectorAll('.niivue-selftest'),function(e){return e.textContent});"
                    "var m=[].map.call(document.querySelectorAll('.niivue-message'),function(e){"
                    "return e.style.display==='none'?'':e.textContent}).filter(Boolean);"
                    "return JSON.stringify({viewers:v.length,selftest:s,messages:m,ready:document.readyState})})()")
                result = json.loads(value)
                if result["ready"] == "complete" and (result["messages"] or (
                        result["viewers"] and len(result["selftest"]) >= result["viewers"])):
                    break
            await asyncio.sleep(0.5)  # late console errors
            if screenshot:
                import base64
                shot = await session.call("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    verdicts = [json.loads(s) for s in result.get("selftest", [])]
    return {
        "console_errors": session.errors,
        "viewers": result.get("viewers", 0),
        "selftest": verdicts,
        "messages": result.get("messages", []),
        "nonblank": bool(verdicts) and all(v.get("nonblank") for v in verdicts),
        "differs": bool(verdicts) and all(v.get("differs") for v in verdicts),
    }


def _devtools_port(proc: subprocess.Popen, profile: str, timeout: float) -> int:
    active = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if active.is_file():
            text = active.read_text().split()
            if text:
                return int(text[0])
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"chromium exited ({proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError("chromium did not open its DevTools port")


class _Session:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.errors: list[str] = []

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                raise RuntimeError("DevTools connection closed")
            msg = json.loads(raw)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    async def evaluate(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())

