"""Chaos on a real local Serve app: each stage's replicas killed while sessions stream, chat, change prompt and
upload audio. Every affected session must resume (`reprimed`, then frames) or end with an `error` and a `closed`
event before a documented close code; no gap longer than two block times that nobody was told about, no 1006.
The whole stage × activity matrix is marked slow; the default run kills the three stages a stream runs through
(Denoiser, VAEDecoder, Ingress); LLM, Speech and ASR kills are slow tests (the ASR kill during speech is in
test_conversation.py's default run)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from livetalk_ray import espeak
from livetalk_ray.config import load_config
from livetalk_ray.serving.chaos import Received, Viewer, judge, kill_replicas
from livetalk_ray.serving.protocol import pcm16
from tests.serving.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BLOCK_S = load_config("toy").block_seconds
RECOVER_S = 120  # a replacement replica loads its model meanwhile (seconds here, on two busy cores)


def open_viewer(url: str) -> tuple[str, Viewer]:
    reply = httpx.post(url + "/v1/sessions", data={"portrait": "ada"}, headers=AUTH, timeout=120)
    assert reply.status_code == 201, reply.text
    session = reply.json()
    viewer = Viewer(url.replace("http", "ws") + session["ws"] + f"?token={TOKEN}")
    assert viewer.wait_blocks(2, since=0, timeout=120), viewer.log
    return session["session_id"], viewer


def start_activity(viewer: Viewer, activity: str) -> None:
    if activity == "chat":
        viewer.send({"type": "chat", "text": "Tell me about the sea."})
    elif activity == "prompt":
        viewer.send({"type": "prompt", "text": "A person smiles at the camera."})
    elif activity == "audio":
        viewer.send({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1})
        viewer.send(pcm16(0.3 * np.sin(np.linspace(0, 2000, 3 * 16000)).astype(np.float32)))
        viewer.send({"type": "say", "text": "Hello from the other side."})
    elif activity == "voice":  # a question spoken into the microphone (conversation mode, the default)
        viewer.send({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1})
        question = espeak.speak("Do you like music?", sample_rate=16000, voice="en-us+f2", words_per_minute=140)
        viewer.send(pcm16(np.concatenate([question, np.zeros(16000, np.float32)])))


def healthy(url: str, timeout: float = RECOVER_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def kill_and_judge(url: str, stage: str, activity: str, sessions: int = 2) -> list:
    opened = [open_viewer(url) for _ in range(sessions)]
    try:
        for _, viewer in opened:
            start_activity(viewer, activity)
        time.sleep(0.3)  # the activity is in flight
        killed_at = time.monotonic()
        assert kill_replicas(stage), f"no {stage} replica to kill"
        for _, viewer in opened:  # resumed (a few blocks after the kill), or ended
            viewer.wait_blocks(3, since=killed_at, timeout=RECOVER_S)
        until = time.monotonic()
        verdicts = [judge(viewer, killed_at, until, BLOCK_S) for _, viewer in opened]
    finally:
        for sid, viewer in opened:
            viewer.close()
            try:
                httpx.delete(url + f"/v1/sessions/{sid}", headers=AUTH, timeout=30)
            except httpx.HTTPError:
                pass
    assert healthy(url), f"the app did not recover after the {stage} kill"
    return verdicts


def assert_no_silent_stall(verdicts, stage: str) -> None:
    for v in verdicts:
        assert v.outcome in ("resumed", "ended_with_error"), (stage, v)
        if stage in ("Denoiser", "VAEDecoder"):  # the stream itself was hit: told at once, then frames again
            assert "reprimed" in v.events and v.recovery_s is not None, (stage, v)
        if stage == "Ingress":  # the sessions lived there: they end, each with an error and a close code
            assert v.outcome == "ended_with_error", (stage, v)


@pytest.mark.parametrize(
    ("stage", "activity"),
    [
        ("Denoiser", "stream"),
        ("VAEDecoder", "prompt"),
        ("Ingress", "chat"),
        pytest.param("LLM", "chat", marks=pytest.mark.slow),  # the replacement loads for 1-2 min on two busy cores
        pytest.param("Speech", "audio", marks=pytest.mark.slow),
        pytest.param("ASR", "voice", marks=pytest.mark.slow),  # in the default run: test_conversation.py
    ],
)
def test_a_killed_stage_never_leaves_a_session_silent(server, stage, activity):
    verdicts = kill_and_judge(server, stage, activity)
    assert_no_silent_stall(verdicts, stage)


@pytest.mark.slow
@pytest.mark.parametrize("activity", ["stream", "chat", "prompt", "audio", "voice"])
@pytest.mark.parametrize("stage", ["Denoiser", "VAEDecoder", "LLM", "Speech", "ASR", "Ingress"])
def test_every_stage_killed_during_every_activity(server, stage, activity):
    assert_no_silent_stall(kill_and_judge(server, stage, activity), stage)


@pytest.mark.slow  # the replacement LLM replica loads for 1-2 minutes on two busy cores
def test_a_chat_after_the_llm_replica_died_is_answered_after_a_recovering_event(server):
    sid, viewer = open_viewer(server)
    try:
        viewer.send({"type": "chat", "text": "My name is Ada."})
        deadline = time.monotonic() + 120
        while not any(r.kind == "speech" for r in viewer.log) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert kill_replicas("LLM")
        asked = time.monotonic()
        viewer.send({"type": "chat", "text": "What is my name?"})
        deadline = time.monotonic() + 2 * RECOVER_S
        answered = []
        while not answered and time.monotonic() < deadline:
            answered = [r for r in viewer.log if r.at > asked and r.kind in ("transcript", "error")]
            answered = [r for r in answered if r.kind == "error" or r.detail.get("role") == "assistant"]
            time.sleep(0.2)
        assert answered and answered[0].kind == "transcript", [(r.kind, r.detail) for r in viewer.log[-10:]]
        told = [r for r in viewer.log if r.at > asked and r.kind == "recovering"]
        assert told and told[0].at - asked < 2 * BLOCK_S + 0.5 and told[0].detail["stage"] == "LLM"
        assert judge(viewer, asked, time.monotonic(), BLOCK_S).outcome == "resumed"
    finally:
        viewer.close()
        httpx.delete(server + f"/v1/sessions/{sid}", headers=AUTH, timeout=30)


class Seen:
    """What a `Viewer` records, written by hand: (seconds, kind) pairs and how the connection closed."""

    def __init__(self, items, close_code=None) -> None:
        self.log = [Received(t, kind) for t, kind in items]
        self.close_code = close_code

    def ended(self) -> bool:
        return self.close_code is not None


def test_the_judge_tells_a_silent_stall_from_a_told_one():
    blocks = [(t * 0.75, "block") for t in range(6)]
    assert judge(Seen(blocks), 0.5, 10, 0.75).outcome == "resumed"  # the stream went on
    frozen = [(0.0, "block"), (0.7, "block"), (6.0, "block"), (6.7, "block")]
    verdict = judge(Seen(frozen), 0.5, 10, 0.75)
    assert verdict.outcome == "stalled" and verdict.longest_silence_s == pytest.approx(5.3)
    told = [(0.0, "block"), (1.2, "reprimed"), (15.0, "block"), (15.7, "block")]
    verdict = judge(Seen(told), 0.5, 20, 0.75)
    assert verdict.outcome == "resumed" and verdict.recovery_s == pytest.approx(13.8)
    assert judge(Seen([(0.0, "block"), (4.0, "block")]), 0.5, 20, 0.75).outcome == "stalled"  # then nothing
    ended = [(0.0, "block"), (0.6, "error"), (0.61, "closed"), (0.62, "close")]
    assert judge(Seen(ended, close_code=1011), 0.5, 5, 0.75).outcome == "ended_with_error"
    assert judge(Seen([(0.0, "block"), (0.6, "close")], close_code=1006), 0.5, 5, 0.75).outcome == "dropped"
    late = [(3.0, "first_frame"), (3.0, "block"), (3.7, "block"), (4.4, "block"), (5.1, "block")]
    assert judge(Seen(late), 0.5, 10, 0.75).outcome == "resumed"  # judged from its first frame
