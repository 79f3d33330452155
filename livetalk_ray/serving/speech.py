"""Text → speech for live sessions: the embedded default is eSpeak NG, resampled to the audio encoder's rate.

eSpeak NG needs no model files, comes with pip (livetalk_ray/espeak.py) and speaks a sentence in about 10 ms
on one CPU core, so the avatar can start talking as soon as the chat model has finished its first sentence.
"""

from __future__ import annotations

import numpy as np

from livetalk_ray import espeak
from livetalk_ray.config import SpeechConfig

# Longer text is refused rather than synthesised: chat replies are a few sentences, and one request must not
# keep a speech worker busy for minutes.
MAX_TEXT_CHARS = 2000


class SpeechError(RuntimeError):
    """Speech that could not be synthesised (eSpeak NG missing, unknown voice); the message says why."""


class Speech:
    """`synthesize(text)` → float32 mono in [-1, 1] at `sample_rate`. Blocking; a server runs it in a thread."""

    def __init__(self, cfg: SpeechConfig, sample_rate: int = 16000) -> None:
        self.cfg = cfg
        self.sample_rate = sample_rate
        try:  # load the library and check the voice now: a replica that cannot speak must fail at start-up
            espeak.speak("ok", voice=cfg.voice, words_per_minute=cfg.words_per_minute)
        except espeak.EspeakError as exc:
            raise SpeechError(f"{exc} (serve.speech.voice)" if "voice" in str(exc) else str(exc)) from None

    def synthesize(self, text: str) -> np.ndarray:
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are spoken at once")
        if not text.strip():
            return np.zeros(0, np.float32)
        try:
            return espeak.speak(
                text, voice=self.cfg.voice, words_per_minute=self.cfg.words_per_minute, sample_rate=self.sample_rate
            )
        except espeak.EspeakError as exc:
            raise SpeechError(str(exc)) from None
