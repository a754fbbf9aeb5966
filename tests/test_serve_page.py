"""The page at ``GET /`` in headless Chromium: type a key and a prompt, see the image appear.

Chromium is driven over the DevTools protocol (a websocket from Python); the test is skipped
when Chromium or the ``websockets`` package is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402
from fd_trt.serving.runtime import ServingRuntime  # noqa: E402

KEY = "page-key-0123456789"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)


class Browser:
    """Headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        ws_client = pytest.importorskip("websockets.sync.client")
        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        t0 = time.monotonic()
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() - t0 > 60 or self.proc.poll() is not None:
                self.close()
                pytest.skip("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = ws_client.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> Any:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - best effort
            pass
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_the_page_is_open_strict_and_holds_no_secret(tmp_path):
    rt = ServingRuntime(
        FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False),
        warmup=False,
    )
    with ThreadedServer(create_app(runtime=rt, api_keys=[KEY])) as s:
        r = httpx.get(s.url + "/")
    rt.shutdown()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert KEY not in r.text and "/v1/generate" in r.text


def test_typing_a_prompt_shows_an_image(browser):
    rt = ServingRuntime(
        FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False),
        warmup=False,
    )
    with ThreadedServer(create_app(runtime=rt, api_keys=[KEY])) as s:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=s.url + "/")
        t0 = time.monotonic()
        while browser.js("document.readyState") != "complete" or not browser.js("!!document.getElementById('go')"):
            assert time.monotonic() - t0 < 30, "the page did not load"
            time.sleep(0.1)
        browser.type_into("#key", KEY)
        browser.type_into("#prompt", "a red circle on the left")
        browser.js("document.getElementById('steps').value = '4'")
        browser.js("document.getElementById('go').click()")
        t0 = time.monotonic()
        width = 0
        while time.monotonic() - t0 < 120:
            width = browser.js("(document.querySelector('#out img') || {}).naturalWidth || 0")
            if width:
                break
            time.sleep(0.2)
        status = browser.js("document.getElementById('status').textContent")
        assert width == 64, status
        assert "4 steps" in status and "key steps" in status and "encoder" in status, status
        # A wrong key shows the server's 401 on the page, and no new image
        browser.js("document.getElementById('key').value = 'wrong'")
        browser.js("document.getElementById('go').click()")
        t0 = time.monotonic()
        while not (browser.js("document.getElementById('status').textContent") or "").startswith("401"):
            assert time.monotonic() - t0 < 30, browser.js("document.getElementById('status').textContent")
            time.sleep(0.2)
    rt.shutdown()
