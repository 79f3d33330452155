"""Text → speech for live sessions: the embedded default is espeak-ng, resampled to the audio encoder's rate.

espeak-ng needs no model files and speaks a sentence in tens of milliseconds on one CPU core, so the avatar
can start talking as soon as the chat model has finished its first sentence.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from livetalk_ray.config import SpeechConfig
from livetalk_ray.media import load_audio

# Longer text is refused rather than synthesised: chat replies are a few sentences, and one request must not
# keep a speech worker busy for minutes.
MAX_TEXT_CHARS = 2000


class SpeechError(RuntimeError):
    """Speech that could not be synthesised (espeak-ng missing or failing); the message says why."""


class Speech:
    """`synthesize(text)` → float32 mono in [-1, 1] at `sample_rate`. Blocking; a server runs it in a thread."""

    def __init__(self, cfg: SpeechConfig, sample_rate: int = 16000) -> None:
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise SpeechError("espeak-ng is not installed: install it with `apt-get install espeak-ng`")
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.binary = binary

    def synthesize(self, text: str) -> np.ndarray:
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are spoken at once")
        if not text.strip():
            return np.zeros(0, np.float32)
        # The text goes in on stdin (-b 1: UTF-8), never as an argument, so no text can be read as an option.
        cmd = [self.binary, "-b", "1", "-v", self.cfg.voice, "-s", str(self.cfg.words_per_minute)]
        with tempfile.TemporaryDirectory(prefix="speech-") as tmp:
            path = Path(tmp) / "speech.wav"
            try:
                done = subprocess.run(
                    [*cmd, "-w", str(path)], input=text.encode(), capture_output=True, timeout=60, check=False
                )
            except subprocess.TimeoutExpired:
                raise SpeechError(f"espeak-ng took over 60 s for {len(text)} characters") from None
            if done.returncode != 0:
                detail = done.stderr.decode(errors="replace").strip()
                raise SpeechError(f"espeak-ng failed (voice {self.cfg.voice!r}): {detail}")
            if not path.is_file() or path.stat().st_size <= 44:  # nothing speakable: no file, or a bare header
                return np.zeros(0, np.float32)
            wave = load_audio(path, self.sample_rate)  # espeak speaks at 22050 Hz; band-limited resampling
        return np.clip(wave, -1.0, 1.0)  # the resampler's filter can overshoot full scale slightly
