from __future__ import annotations

import functools
import io
import wave

import numpy as np
import pytest

from livetalk_ray import espeak
from livetalk_ray.config import ASRConfig, ConfigError
from livetalk_ray.serving.asr import (
    SAMPLE_RATE,
    Listener,
    OpenAITranscription,
    PocketSphinx,
    TurnDetector,
    Whisper,
    wav_bytes,
)
from tests.serving.fake_openai import FakeOpenAI, fake_openai

QUESTION, KEY_WORDS = "Please tell me something interesting.", {"tell", "something", "interesting"}
# The user's voice in tests and bench/voice.py: of eSpeak NG's voices and rates, the one pocketsphinx's en-us model
# recognises best (68 % of the words of six test questions, against 46 % for the default voice at 140 wpm).
USER_VOICE = {"voice": "en-us+f2", "words_per_minute": 140}


@functools.cache
def sphinx() -> PocketSphinx:
    return PocketSphinx()


def spoken(text: str) -> np.ndarray:
    return espeak.speak(text, sample_rate=SAMPLE_RATE, **USER_VOICE)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def hear_all(listener: Listener, audio: np.ndarray, chunk_s: float = 0.1) -> list[tuple[float, dict]]:
    """Feed `audio` in client-sized chunks; each event with the audio time at which it came out."""
    step, out = int(chunk_s * SAMPLE_RATE), []
    for i in range(0, len(audio), step):
        out += [((i + step) / SAMPLE_RATE, e) for e in listener.hear(audio[i : i + step])]
    return out


def test_turn_detector_needs_a_run_of_speech_to_start_and_of_silence_to_end() -> None:
    turn = TurnDetector(threshold=0.5, start_windows=3, end_windows=4)
    steps = [turn.step(p) for p in [0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.2, 0.45, 0.2, 0.2, 0.2, 0.2]]
    # a short burst (2 windows) is not speech; 3 in a row start it; 0.45 is a dip inside speech (hysteresis), not
    # silence, so it restarts the count; 4 clear windows end it
    assert steps == [None, None, None, None, None, "start", None, None, None, None, None, "end"]
    cfg = TurnDetector.from_config(ASRConfig(start_speech_ms=200, end_silence_ms=600))
    assert (cfg.start_windows, cfg.end_windows) == (6, 19)  # 32 ms windows


def test_a_spoken_question_becomes_one_turn_with_its_words() -> None:
    listener = Listener(ASRConfig(), sphinx(), keep_audio=True)
    speech = spoken(QUESTION)
    events = hear_all(listener, np.concatenate([silence(1.0), speech, silence(1.5)]))
    kinds = [e["event"] for _, e in events]
    assert kinds[0] == "speech_started" and kinds[-1] == "final" and kinds.count("final") == 1
    assert "partial" in kinds  # pocketsphinx decodes while the user speaks
    started_at, _ = events[0]
    assert 1.0 + 0.2 <= started_at <= 1.0 + 0.5  # start_speech_ms after the onset, within a chunk
    ended_at, final = events[-1]
    end_of_speech = 1.0 + np.nonzero(np.abs(speech) > 0.01)[0][-1] / SAMPLE_RATE  # eSpeak ends with a pause
    assert end_of_speech + 0.5 <= ended_at <= end_of_speech + 1.0  # end_silence_ms after the last word
    assert KEY_WORDS <= set(final["text"].split()) and not final["cut"]
    # the turn's audio comes along for an audio-native LLM: the speech, from a little before its detected start
    assert len(speech) <= len(final["audio"]) <= len(speech) + 1.2 * SAMPLE_RATE


def test_minutes_of_silence_and_a_cough_are_not_turns_and_a_muted_microphone_is_reported_once() -> None:
    listener = Listener(ASRConfig(silence_notice_s=60.0), sphinx())
    cough = 0.5 * np.random.default_rng(0).standard_normal(int(0.08 * SAMPLE_RATE)).astype(np.float32)
    events = hear_all(listener, np.concatenate([silence(180.0), cough, silence(70.0)]), chunk_s=1.0)
    # one notice per muted stretch: at 60 s, and 60 s after the cough ended the first stretch
    assert [e["event"] for _, e in events] == ["silence", "silence"]
    assert 60.0 <= events[0][0] <= 61.0 and events[0][1]["seconds"] == pytest.approx(60.0, abs=0.05)
    assert 240.0 <= events[1][0] <= 241.5


def test_a_quiet_room_is_not_a_muted_microphone() -> None:
    room = 0.003 * np.random.default_rng(1).standard_normal(int(90 * SAMPLE_RATE)).astype(np.float32)  # -50 dBFS
    events = hear_all(Listener(ASRConfig(silence_notice_s=60.0), sphinx()), room, chunk_s=1.0)
    assert events == []


def test_a_listener_opened_mid_turn_waits_for_a_pause() -> None:
    words = spoken(QUESTION)
    rest_of_a_turn = words[len(words) // 3 :]  # its start went to a listener that was lost
    listener = Listener(ASRConfig(), sphinx(), mid_turn=True)
    events = [e for _, e in hear_all(listener, np.concatenate([rest_of_a_turn, silence(1.0), words, silence(1.0)]))]
    assert [e["event"] for e in events if e["event"] != "partial"] == ["speech_started", "final"]
    assert len(KEY_WORDS & set(events[-1]["text"].split())) >= 2, events[-1]  # the whole question, not its rest


def test_a_monologue_is_cut_at_max_turn_and_goes_on() -> None:
    listener = Listener(ASRConfig(max_turn_s=4.0), sphinx())
    words = spoken("one two three four five six seven eight nine ten")
    talk = np.concatenate([words] * 4)  # ~12 s with no pause as long as end_silence_ms
    events = [e for _, e in hear_all(listener, np.concatenate([talk, silence(1.5)]))]
    finals = [e for e in events if e["event"] == "final"]
    assert [e["cut"] for e in finals[:-1]] and all(e["cut"] for e in finals[:-1]) and not finals[-1]["cut"]
    assert all(e["seconds"] <= 4.0 + 0.05 for e in finals)
    assert len(finals) >= 3 and sum(e["seconds"] for e in finals) >= len(talk) / SAMPLE_RATE - 0.5


def test_wav_bytes_round_trip() -> None:
    x = (0.5 * np.sin(np.arange(1600) / 3)).astype(np.float32)
    with wave.open(io.BytesIO(wav_bytes(x))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (SAMPLE_RATE, 1, 2, 1600)
        back = np.frombuffer(w.readframes(1600), "<i2") / 32767
    assert np.abs(back - x).max() < 1e-4


def test_an_openai_transcription_endpoint_hears_whole_turns() -> None:
    with fake_openai() as url:
        cfg = ASRConfig(backend="openai", endpoint=url, model_name="whisper-large-v3")
        listener = Listener(cfg, OpenAITranscription(cfg))
        events = [e for _, e in hear_all(listener, np.concatenate([silence(0.5), spoken(QUESTION), silence(1.0)]))]
        sent = FakeOpenAI.requests
    assert [e["event"] for e in events] == ["speech_started", "final"]  # no partials from a whole-turn recogniser
    assert events[-1]["text"] == FakeOpenAI.transcript
    assert sent[0]["path"] == "/v1/audio/transcriptions"
    assert sent[0]["fields"]["model"] == b"whisper-large-v3" and sent[0]["fields"]["language"] == b"en"
    assert 1.5 < sent[0]["seconds"] < 4.0


def test_recognisers_that_cannot_run_say_what_to_set() -> None:
    with pytest.raises(ConfigError, match="serve.asr.endpoint is required"):
        OpenAITranscription(ASRConfig(backend="openai"))
    with pytest.raises(ConfigError, match="serve.asr.path is required"):
        Whisper(ASRConfig(backend="whisper"))
    with pytest.raises(ConfigError, match="is not a directory"):
        Whisper(ASRConfig(backend="whisper", path="/nonexistent/whisper-small"))
