"""The web page in real headless Chromium against the real Serve app: pick a portrait, start a session,
watch frames drawn at about real time with audio scheduled beside them, read text aloud, end the session."""

from __future__ import annotations

import shutil
import time

import numpy as np
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


def test_the_microphone_talks_to_the_avatar(server, tmp_path):
    """Chromium's fake microphone plays a spoken question (then silence, looped); the page streams it, the avatar
    hears it (the user's words in the log), answers aloud, and the state badge follows."""
    from playwright.sync_api import sync_playwright

    from livetalk_ray import espeak
    from livetalk_ray.serving.asr import wav_bytes
    from tests.serving.test_asr import USER_VOICE

    question = espeak.speak("Do you like music?", sample_rate=16000, **USER_VOICE)
    wav = tmp_path / "question.wav"
    wav.write_bytes(wav_bytes(np.concatenate([np.zeros(8000, np.float32), question, np.zeros(30 * 16000, np.float32)])))
    flags = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox", *flags]
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server}/?token={TOKEN}")
            page.wait_for_selector("#portraits img", timeout=60_000)
            page.locator("#portraits img").nth(0).click()
            page.click("#start")
            page.wait_for_function("window.livetalk.drawn >= 10", timeout=120_000)
            assert page.inner_text("#state") == "listening"
            page.click("#mic")
            page.wait_for_function("document.getElementById('log').innerText.includes('music')", timeout=60_000)
            page.wait_for_function("document.getElementById('state').innerText === 'speaking'", timeout=60_000)
            page.wait_for_function("document.getElementById('log').innerText.includes('avatar:')", timeout=60_000)
            page.click("#mic")  # off again
            assert page.inner_text("#mic") == "Talk (microphone)"
            log = page.inner_text("#log")
            assert "error" not in log, log
            page.click("#stop")
            assert not errors, errors
        finally:
            browser.close()
