from __future__ import annotations

import numpy as np
import pytest

from livetalk_ray.toyworld import speech
from livetalk_ray.toyworld.speech import (
    SENTENCES,
    espeak_available,
    openness_from_envelope,
    speech_envelope,
    synthesize_speech,
)

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="eSpeak NG cannot be loaded")


def _check_wave(wave: np.ndarray, seconds: float) -> None:
    assert wave.dtype == np.float32 and wave.shape == (int(round(seconds * 16000)),)
    assert np.isfinite(wave).all() and 0.3 < np.abs(wave).max() <= 1.0


def test_sentence_list() -> None:
    assert len(SENTENCES) >= 50 and len(set(SENTENCES)) == len(SENTENCES)


def test_synthetic_voice_is_deterministic_with_pauses() -> None:
    a = synthesize_speech(None, 4, 3.0, engine="synthetic")
    _check_wave(a, 3.0)
    assert np.array_equal(a, synthesize_speech(None, 4, 3.0, engine="synthetic"))
    assert not np.array_equal(a, synthesize_speech(None, 5, 3.0, engine="synthetic"))
    env = speech_envelope(synthesize_speech(None, 4, 6.0, engine="synthetic"), 16)
    assert (env == 0).sum() >= 3  # pauses between phrases
    assert (env > 0.5).sum() >= 20


@needs_espeak
def test_espeak_voice_is_deterministic_and_varied() -> None:
    a = synthesize_speech(None, 4, 3.0, engine="espeak")
    _check_wave(a, 3.0)
    assert np.array_equal(a, synthesize_speech(None, 4, 3.0, engine="espeak"))
    b = synthesize_speech(None, 5, 3.0, engine="espeak")
    assert not np.array_equal(a, b)
    env = speech_envelope(synthesize_speech(None, 4, 8.0, engine="espeak"), 16)
    assert (env == 0).sum() >= 3 and (env > 0.5).sum() >= 30
    # Not the synthetic fallback in disguise.
    assert not np.array_equal(a, synthesize_speech(None, 4, 3.0, engine="synthetic"))


@needs_espeak
def test_espeak_speaks_given_text_then_pads() -> None:
    wave = synthesize_speech("Hello.", 1, 4.0, engine="espeak")
    _check_wave(wave, 4.0)
    assert np.abs(wave[-16000:]).max() == 0.0  # a one-word text leaves the last second silent


def test_espeak_engine_without_binary_fails_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech, "espeak_available", lambda: False)
    with pytest.raises(RuntimeError, match="espeakng-loader"):
        synthesize_speech(None, 1, 1.0, engine="espeak")
    auto = synthesize_speech(None, 1, 1.0, engine="auto")
    assert np.array_equal(auto, synthesize_speech(None, 1, 1.0, engine="synthetic"))


def test_rejects_non_positive_duration() -> None:
    with pytest.raises(ValueError):
        synthesize_speech(None, 1, 0.0)


def test_envelope_timing_and_range() -> None:
    sr, fps = 16000, 16
    t = np.arange(3 * sr) / sr
    wave = np.where((t >= 1.0) & (t < 1.5), 0.5 * np.sin(2 * np.pi * 220 * t), 0.0).astype(np.float32)
    env = speech_envelope(wave, fps, sr)
    assert env.shape == (48,) and env.dtype == np.float32
    assert env.min() >= 0 and env.max() <= 1
    loud = np.flatnonzero(env > 0.5)
    assert loud.min() >= 15 and loud.max() <= 24  # frames 16..23 cover 1.0-1.5 s
    assert env[:13].max() == 0 and env[27:].max() == 0
    assert np.array_equal(speech_envelope(np.zeros(sr, np.float32), fps, sr), np.zeros(16, np.float32))


def test_openness_lag() -> None:
    env = np.array([0, 0, 1, 0.5, 0, 0], np.float32)
    assert np.array_equal(openness_from_envelope(env), env)
    assert np.array_equal(openness_from_envelope(env, 1), [0, 0, 0, 1, 0.5, 0])
    assert np.array_equal(openness_from_envelope(env, -2), [1, 0.5, 0, 0, 0, 0])
