"""Conversation mode through the real Serve app with its embedded chain (silero-vad + pocketsphinx → SmolLM2 →
eSpeak NG): the user's voice is synthesized speech sent as PCM over the WebSocket at the pace a microphone sends it.
A question is heard and answered aloud; talking over the avatar cuts it within a block; PCM in a wrong format, a
muted microphone, a monologue and an ASR replica that dies each get a clear event, and the session goes on."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from livetalk_ray import espeak
from livetalk_ray.config import load_config
from livetalk_ray.serving.chaos import Viewer, kill_replicas
from livetalk_ray.serving.protocol import pcm16
from tests.serving.conftest import TOKEN
from tests.serving.test_asr import USER_VOICE

AUTH = {"Authorization": f"Bearer {TOKEN}"}
RATE = 16000
CFG = load_config("toy")
BLOCK_S = CFG.block_seconds
FORMAT = {"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": RATE, "channels": 1}
STORY = (
    "Once upon a time there was a dragon who lived on a hill. Every morning it flew over the village. "
    "The children waved and the dragon waved back. One day it brought them a basket of apples."
)


def voice(text: str, pause_s: float = 1.2) -> np.ndarray:
    speech = espeak.speak(text, sample_rate=RATE, **USER_VOICE)
    return np.concatenate([speech, np.zeros(int(pause_s * RATE), np.float32)])


def onset_s(audio: np.ndarray) -> float:
    return float(np.argmax(np.abs(audio) > 0.02)) / RATE


def open_viewer(url: str) -> tuple[str, Viewer]:
    reply = httpx.post(url + "/v1/sessions", data={"portrait": "ada"}, headers=AUTH, timeout=120)
    assert reply.status_code == 201, reply.text
    session = reply.json()
    assert session["mode"] == "conversation"  # the default
    viewer = Viewer(url.replace("http", "ws") + session["ws"] + f"?token={TOKEN}")
    assert viewer.wait_blocks(2, since=0, timeout=120), viewer.log
    viewer.send(FORMAT)
    return session["session_id"], viewer


def talk(viewer: Viewer, audio: np.ndarray, chunk_s: float = 0.25, pace: float = 1.0) -> float:
    """Send `audio` as a microphone does: a chunk every `chunk_s` (sped up `pace` times). Returns when it began."""
    started, step = time.monotonic(), int(chunk_s * RATE)
    for k, i in enumerate(range(0, len(audio), step)):
        viewer.send(pcm16(audio[i : i + step]))
        time.sleep(max(0.0, started + (k + 1) * chunk_s / pace - time.monotonic()))
    return started


def wait_for(viewer: Viewer, test, since: float = 0.0, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in list(viewer.log):
            if r.at >= since and test(r):
                return r
        time.sleep(0.05)
    raise AssertionError(f"not seen in {timeout} s: {[(r.kind, r.detail) for r in viewer.log if r.kind != 'block']}")


def seen(viewer: Viewer, kind: str, since: float = 0.0, **match) -> list[dict]:
    return [
        r.detail
        for r in list(viewer.log)
        if r.kind == kind and r.at >= since and all(r.detail.get(k) == v for k, v in match.items())
    ]


def is_answer(r) -> bool:
    return r.kind == "transcript" and r.detail["role"] == "assistant"


@pytest.fixture
def session(server):
    sid, viewer = open_viewer(server)
    yield viewer
    viewer.close()
    httpx.delete(server + f"/v1/sessions/{sid}", headers=AUTH, timeout=30)


def test_a_spoken_question_is_heard_answered_and_spoken(session):
    asked = talk(session, voice("Do you like music?"))
    spoken = wait_for(session, lambda r: r.kind == "speech", since=asked)
    wait_for(session, lambda r: r.kind == "block" and r.detail["speech_at_s"] is not None, since=spoken.at, timeout=30)
    final = seen(session, "transcript", role="user", final=True)
    assert len(final) == 1 and {"like", "music"} <= set(final[0]["text"].split()), final
    assert seen(session, "transcript", role="assistant")
    states = [e["state"] for e in seen(session, "state")]
    assert states[:3] == ["listening", "thinking", "speaking"], states
    assert not seen(session, "error"), seen(session, "error")


def test_talking_over_the_avatar_stops_it_within_a_block_and_the_session_goes_on(session):
    session.send({"type": "say", "text": STORY})
    loud = wait_for(session, lambda r: r.kind == "block" and r.detail["speech_at_s"] is not None)
    time.sleep(max(0.0, 3.5 - (time.monotonic() - loud.at)))  # blocks arrive up to lead_blocks early
    question = voice("Do you like music?")
    started = talk(session, question)
    cut = wait_for(session, lambda r: r.kind == "interrupted", since=started)
    voice_confirmed = started + onset_s(question) + CFG.serve.asr.start_speech_ms / 1000
    assert cut.at - voice_confirmed <= BLOCK_S, cut.at - voice_confirmed
    answer = wait_for(session, is_answer, since=cut.at)  # the question is answered after the cut
    after = [r for r in list(session.log) if cut.at < r.at < answer.at and r.kind == "block"]
    assert len(after) >= 2  # the avatar went on (listening, driven by silence), it did not freeze
    assert all(r.detail["loud"] == 0 for r in after if r.detail["index"] >= cut.detail["from_block"])
    heard = cut.detail["heard"].removesuffix("...")
    assert heard and STORY.startswith(heard) and len(heard) < len(STORY) / 2, cut.detail
    assert "music" in seen(session, "transcript", role="user", final=True)[-1]["text"]


def test_pcm_in_a_wrong_format_is_refused_and_the_session_goes_on(session):
    session.send({"type": "audio_format", "encoding": "pcm_f32le", "sample_rate": RATE, "channels": 1})
    session.send({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": RATE, "channels": 2})
    session.send(FORMAT)
    session.send(b"\x01\x02\x03")  # not whole 16-bit samples
    time.sleep(1.0)
    refused = [e["message"] for e in seen(session, "error", code="bad_message")]
    assert len(refused) == 3, seen(session, "error")
    assert all(len(m.splitlines()) == 1 for m in refused), refused
    t = time.monotonic()
    assert session.wait_blocks(2, since=t, timeout=10) and not session.ended()


def test_minutes_of_a_muted_microphone_are_reported_once(session):
    started = time.monotonic()
    for _ in range(18):  # three minutes of zeros, sent as fast as they are heard
        session.send(pcm16(np.zeros(10 * RATE, np.float32)))
        time.sleep(1.0)
    wait_for(session, lambda r: r.kind == "error" and r.detail["code"] == "no_speech", since=started, timeout=30)
    time.sleep(2.0)
    assert len(seen(session, "error", code="no_speech")) == 1, seen(session, "error")
    assert not seen(session, "transcript") and not seen(session, "error", code="busy")
    assert session.wait_blocks(2, since=time.monotonic(), timeout=10) and not session.ended()


def monologue(seconds: float) -> np.ndarray:
    words = espeak.speak("one two three four five six seven eight nine ten", sample_rate=RATE, **USER_VOICE)
    return np.concatenate([words] * int(np.ceil(seconds * RATE / len(words))))[: int(seconds * RATE)]


def run_monologue(viewer: Viewer, seconds: float) -> None:
    started = time.monotonic()
    talk(viewer, np.concatenate([monologue(seconds), np.zeros(RATE, np.float32)]), chunk_s=5.0, pace=4.0)
    wait_for(viewer, is_answer, since=started, timeout=180)  # answered at the pause
    assert len(seen(viewer, "error", code="turn_too_long")) == 1, seen(viewer, "error")
    finals = seen(viewer, "transcript", role="user", final=True)
    cuts = int(seconds // CFG.serve.asr.max_turn_s)
    assert [e["cut"] for e in finals] == [True] * cuts + [False], finals
    assert not seen(viewer, "error", code="busy") and not viewer.ended()


def test_a_monologue_is_cut_into_turns_and_answered_at_the_pause(session):
    run_monologue(session, 75.0)


@pytest.mark.slow  # ten minutes of speech are heard in about two and a half
def test_a_ten_minute_monologue(session):
    run_monologue(session, 600.0)


def test_speech_while_the_asr_replica_is_down_is_reported_and_heard_again_after(session):
    assert kill_replicas("ASR")
    killed = time.monotonic()
    talk(session, voice("Do you like music?"))
    wait_for(session, lambda r: r.kind == "error" and r.detail["code"] == "not_heard", since=killed, timeout=120)
    recovering = seen(session, "recovering", since=killed)
    assert recovering and recovering[0]["stage"] == "ASR"
    wait_for(session, lambda r: r.kind == "recovered", since=killed, timeout=180)  # a new replica listens
    asked = talk(session, voice("Do you like music?"))
    wait_for(session, is_answer, since=asked, timeout=120)
    assert "music" in seen(session, "transcript", since=asked, role="user", final=True)[0]["text"]
    assert not session.ended()
