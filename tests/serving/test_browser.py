"""The web page in real headless Chromium against the real Serve app: pick a portrait, start a session,
watch frames drawn at about real time with audio scheduled beside them, read text aloud, end the session."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.serving.conftest import TOKEN

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)


def test_the_page_streams_a_talking_avatar(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server}/?token={TOKEN}")
            page.wait_for_selector("#portraits img", timeout=60_000)
            page.locator("#portraits img").nth(1).click()
            page.click("#start")
            page.wait_for_function("window.livetalk.drawn >= 20", timeout=120_000)
            assert "first frame" in page.inner_text("#log")
            # Frames are drawn at about the stream's 16 fps and every block scheduled its audio.
            start = page.evaluate("window.livetalk.drawn")
            time.sleep(3)
            rate = (page.evaluate("window.livetalk.drawn") - start) / 3
            assert 10 <= rate <= 20, rate
            state = page.evaluate("({blocks: window.livetalk.blocks, audio: window.livetalk.audioBlocks})")
            assert state["blocks"] >= 3 and state["audio"] == state["blocks"], state
            # The canvas shows an image, not a blank screen.
            spread = page.evaluate(
                """() => { const c = document.getElementById('screen');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let lo = 255, hi = 0;
                   for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
                   return hi - lo; }"""
            )
            assert spread > 30, spread
            assert "FPS" in page.inner_text("#stats") and "first frame" in page.inner_text("#stats")
            page.fill("#text", "Good morning, everyone.")
            page.click("#say")
            page.wait_for_function("document.getElementById('log').innerText.includes('read aloud')", timeout=30_000)
            page.click("#stop")
            page.wait_for_function(
                "document.getElementById('log').innerText.includes('session closed')", timeout=60_000
            )
            assert not errors, errors
        finally:
            browser.close()
