from __future__ import annotations

import time

import numpy as np
import pytest

from livetalk_ray.config import LiveTalkConfig, SpeechConfig
from livetalk_ray.serving.speech import MAX_TEXT_CHARS, Speech, SpeechError


@pytest.fixture
def speech(toy_cfg: LiveTalkConfig) -> Speech:
    return Speech(toy_cfg.serve.speech, toy_cfg.audio.sample_rate)


def _rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


def test_sentence_is_16k_float_speech(speech: Speech) -> None:
    start = time.perf_counter()
    wave = speech.synthesize("Paris is the capital of France.")
    elapsed = time.perf_counter() - start
    assert speech.sample_rate == 16000
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 1.0 < len(wave) / 16000 < 10.0
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0
    assert _rms(wave) > 0.02  # speech, not silence
    assert elapsed < 5.0  # tens of milliseconds when the machine is idle


def test_longer_text_is_longer_audio(speech: Speech) -> None:
    short = speech.synthesize("Hello there.")
    long = speech.synthesize("Hello there. The Eiffel Tower was finished in 1889 and is three hundred metres tall.")
    assert len(long) > 2 * len(short) > 0


def test_text_cannot_become_an_option(speech: Speech) -> None:
    # Text is passed to the library as data: these are spoken, never read as options.
    for text in ("--help", "-v xx -s 80 minus signs first."):
        assert _rms(speech.synthesize(text)) > 0.02


def test_non_ascii_and_punctuation_only(speech: Speech) -> None:
    assert len(speech.synthesize("Café au lait, s'il vous plaît.")) > 16000 // 2
    assert speech.synthesize("").shape == (0,) and speech.synthesize(" \n\t").shape == (0,)


def test_limits_and_errors(speech: Speech, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(ValueError, match=str(MAX_TEXT_CHARS)):
        speech.synthesize("a" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(SpeechError, match="voice 'zz-missing'.*serve.speech.voice"):
        Speech(SpeechConfig(voice="zz-missing"))  # at start-up, not at the first sentence


def test_speaks_without_the_espeak_ng_program(speech: Speech, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on PATH: the pip-installed library speaks
    assert _rms(Speech(SpeechConfig()).synthesize("Hello there.")) > 0.02
