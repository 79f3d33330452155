"""A conversation-mode session in process (Serve-free) on the real stages: the Denoiser and VAEDecoder, the ASR
stage (silero-vad + pocketsphinx), Speech (eSpeak NG) and the LLM stage talking to a fake OpenAI-compatible server
over HTTP. The user's voice is synthesized speech pushed at real-time pace, as a microphone sends it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from livetalk_ray import espeak
from livetalk_ray.serving.app import ASR, LLM, SpeechSynth
from livetalk_ray.serving.conversation import Turn
from livetalk_ray.serving.denoiser import Denoiser
from livetalk_ray.serving.live import Live
from livetalk_ray.serving.protocol import decode_block
from livetalk_ray.serving.session import SessionSpec
from livetalk_ray.serving.vae_decoder import VAEDecoder
from tests.serving.fake_openai import FakeOpenAI, fake_openai
from tests.serving.test_asr import USER_VOICE
from tests.serving.test_session import cfg_with, png_bytes

RATE = 16000
STORY = (
    "Once upon a time there was a dragon who lived on a hill. Every morning it flew over the village. "
    "The children waved and the dragon waved back. One day it brought them a basket of apples. "
    "They shared the apples with everyone. The dragon was happy and flew home to sleep."
)


def voice(text: str, pause_s: float = 1.2) -> np.ndarray:
    """`text` in the test user's voice, then a pause long enough to end the turn."""
    speech = espeak.speak(text, sample_rate=RATE, **USER_VOICE)
    return np.concatenate([speech, np.zeros(int(pause_s * RATE), np.float32)])


def onset_s(audio: np.ndarray) -> float:
    return float(np.argmax(np.abs(audio) > 0.02)) / RATE


class Recorder:
    """Everything the session publishes, with the time it came out; blocks decoded."""

    def __init__(self, live: Live) -> None:
        self.items: list[tuple[float, object]] = []
        self.queue = live.subscribe()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            item = await self.queue.get()
            if isinstance(item, bytes):
                header, _, pcm = decode_block(item)
                item = {"type": "block", "index": header["index"], "loud": float(np.abs(pcm).max(initial=0))}
            self.items.append((time.monotonic(), item))

    def events(self, kind: str, since: float = 0.0) -> list[dict]:
        return [e for t, e in self.items if e["type"] == kind and t >= since]

    async def wait_for(self, test, timeout: float = 60.0, since: float = 0.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, e in self.items:
                if t >= since and test(e):
                    return t, e
            await asyncio.sleep(0.05)
        seen = [e for _, e in self.items if e["type"] != "block"]
        raise AssertionError(f"not published within {timeout} s; events so far: {seen}")


class CountingSpeech(SpeechSynth):
    calls = 0

    async def synthesize(self, text: str) -> np.ndarray:
        CountingSpeech.calls += 1
        return await super().synthesize(text)


@pytest.fixture
def endpoint():
    with fake_openai() as url:
        yield url


@pytest.fixture
def stages():
    data = cfg_with().model_dump(mode="json")
    return Denoiser(data, None), VAEDecoder(data)


def make_live(stages, endpoint, *overrides) -> tuple[Live, dict]:
    cfg = cfg_with("serve.llm.backend=openai", f"serve.llm.endpoint={endpoint}", *overrides)
    data = cfg.model_dump(mode="json")
    handles = {"denoiser": stages[0], "decoder": stages[1], "llm": LLM(data), "speech": CountingSpeech(data)}
    handles["asr"] = ASR(data)
    image = np.full((64, 64, 3), 120, np.uint8)
    spec = SessionSpec("s1", png_bytes(image), "a friendly guide", "A person talks.", seed=1, mode="conversation")
    return Live(spec, cfg, handles), handles


async def opened(live: Live) -> Recorder:
    await asyncio.gather(live.open_chat(), live.open_ear())
    recorder = Recorder(live)
    live.start()
    return recorder


async def say(live: Live, audio: np.ndarray, chunk_s: float = 0.1) -> float:
    """Push `audio` as a microphone does (a chunk every `chunk_s`); returns when it started."""
    started, step = time.monotonic(), int(chunk_s * RATE)
    for k, i in enumerate(range(0, len(audio), step)):
        live.ear.push(audio[i : i + step])
        await asyncio.sleep(max(0.0, started + (k + 1) * chunk_s - time.monotonic()))
    return started


async def close(live: Live, recorder: Recorder) -> None:
    recorder.task.cancel()
    await live.stop()
    await live.release()


def test_a_spoken_question_is_heard_answered_and_spoken(stages, endpoint) -> None:
    FakeOpenAI.reply = ["Yes, I love ", "music. Jazz ", "most of all."]

    async def main():
        live, _ = make_live(stages, endpoint)
        recorder = await opened(live)
        await say(live, voice("Do you like music?"))
        await recorder.wait_for(lambda e: e["type"] == "speech")
        await recorder.wait_for(lambda e: e["type"] == "state" and e["state"] == "listening", since=time.monotonic())
        await close(live, recorder)
        return recorder, live

    recorder, live = asyncio.run(main())
    final = [e for e in recorder.events("transcript") if e["role"] == "user" and e.get("final")]
    assert len(final) == 1 and {"like", "music"} <= set(final[0]["text"].split()), final
    assert any(e["role"] == "user" and e.get("final") is False for e in recorder.events("transcript"))  # partials
    asked = FakeOpenAI.requests[-1]["body"]["messages"]
    assert asked[-1] == {"role": "user", "content": final[0]["text"]}
    answer = [e["text"] for e in recorder.events("transcript") if e["role"] == "assistant"]
    assert answer == ["Yes, I love music.", "Jazz most of all."]
    assert [e["text"] for e in recorder.events("speech")] == answer
    states = [e["state"] for e in recorder.events("state")]
    assert states == ["listening", "thinking", "speaking", "listening"]
    assert any(e["loud"] > 0.03 for e in recorder.events("block"))  # the avatar's voice is in the stream
    assert list(live.history) == [(final[0]["text"], " ".join(answer))]
    assert CountingSpeech.calls >= 2


def test_talking_over_the_avatar_cuts_its_answer_within_a_block(stages, endpoint) -> None:
    FakeOpenAI.reply = [STORY]
    block_s = cfg_with().block_seconds

    async def main():
        live, _ = make_live(stages, endpoint)
        recorder = await opened(live)
        live.add_turn(Turn("chat", "tell me a story"))
        spoke_at, _ = await recorder.wait_for(lambda e: e["type"] == "block" and e["loud"] > 0.03)
        await asyncio.sleep(2.5 - (time.monotonic() - spoke_at))  # the user hears the story for a while
        question = voice("Do you like music?")
        started = await say(live, question)
        cut_at, cut = await recorder.wait_for(lambda e: e["type"] == "interrupted")
        await recorder.wait_for(lambda e: e["type"] == "speech", since=cut_at)  # the question is answered
        await close(live, recorder)
        return recorder, live, started + onset_s(question), cut_at, cut

    recorder, live, voice_at, cut_at, cut = asyncio.run(main())
    start_speech_s = cfg_with().serve.asr.start_speech_ms / 1000
    assert cut_at - (voice_at + start_speech_s) <= block_s, (cut_at - voice_at, block_s)
    # the story's blocks from `from_block` on go silent; nothing of it is spoken after the cut
    after = [t_e for t_e in recorder.items if t_e[0] > cut_at]
    next_answer = next(t for t, e in after if e["type"] == "transcript" and e["role"] == "assistant")
    quiet = [e for t, e in after if e["type"] == "block" and t < next_answer and e["index"] >= cut["from_block"]]
    assert quiet and all(e["loud"] == 0 for e in quiet)
    # what the user heard is a beginning of the story, and all the chat remembers of it
    heard = cut["heard"].removesuffix("...")
    assert heard and STORY.startswith(heard) and len(heard) < len(STORY) / 2
    story_question = FakeOpenAI.requests[1]["body"]["messages"]
    assert story_question[-3:-1] == [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": cut["heard"]},
    ]
    assert live.history[0] == ("tell me a story", cut["heard"])
    final = [e for e in recorder.events("transcript") if e["role"] == "user" and e.get("final")]
    assert "music" in final[-1]["text"]
    states = [e["state"] for e in recorder.events("state")]
    assert states[:5] == ["listening", "thinking", "speaking", "listening", "thinking"]


def test_an_audio_native_model_hears_the_voice_and_speaks_itself(stages, endpoint) -> None:
    FakeOpenAI.reply = ["Music is ", "lovely."]
    CountingSpeech.calls = 0

    async def main():
        live, _ = make_live(stages, endpoint, "serve.llm.audio_input=true", "serve.llm.audio_voice=alloy")
        recorder = await opened(live)
        question = voice("Do you like music?")
        await say(live, question)
        await recorder.wait_for(lambda e: e["type"] == "speech")
        await recorder.wait_for(lambda e: e["type"] == "block" and e["loud"] > 0.03)
        await close(live, recorder)
        return recorder, question

    recorder, question = asyncio.run(main())
    body = FakeOpenAI.requests[-1]["body"]
    assert body["modalities"] == ["text", "audio"] and body["audio"]["voice"] == "alloy"
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["input_audio"] and parts[0]["input_audio"]["format"] == "wav"
    assert CountingSpeech.calls == 0  # the model's own voice: the Speech stage is skipped
    assert [e["text"] for e in recorder.events("speech")] == ["Music is lovely."]


def test_a_listener_lost_mid_turn_is_reported_reopened_and_hears_again(stages, endpoint) -> None:
    FakeOpenAI.reply = ["Yes."]

    async def main():
        live, handles = make_live(stages, endpoint)
        recorder = await opened(live)
        question = voice("Do you like music?")
        half = len(question) // 3
        await say(live, question[:half])
        await handles["asr"].close("s1")  # the replica lost the session (died, or reaped it)
        await say(live, question[half:])
        await recorder.wait_for(lambda e: e.get("code") == "not_heard")
        await recorder.wait_for(lambda e: e["type"] == "recovered")
        await say(live, question)
        await recorder.wait_for(lambda e: e["type"] == "speech")
        await close(live, recorder)
        return recorder

    recorder = asyncio.run(main())
    assert [e["stage"] for e in recorder.events("recovering")] == ["ASR"]
    finals = [e["text"] for e in recorder.events("transcript") if e["role"] == "user" and e.get("final")]
    assert len(finals) == 1 and "music" in finals[0]


def test_a_client_that_stops_sending_ends_its_turn_as_a_pause_would(stages, endpoint) -> None:
    FakeOpenAI.reply = ["Yes."]

    async def main():
        live, _ = make_live(stages, endpoint)
        recorder = await opened(live)
        sent = await say(live, voice("Do you like music?", pause_s=0.0))  # push-to-talk: no trailing silence
        _, final = await recorder.wait_for(lambda e: e["type"] == "transcript" and e.get("final"), timeout=10)
        ended_at = time.monotonic()
        await close(live, recorder)
        return final, ended_at - sent

    final, took = asyncio.run(main())
    assert "music" in final["text"] and took < 5.0
