"""Listening in conversation mode: when the user speaks, when their turn ends, and what they said.

A `Listener` holds one session's ear: silero-vad scores every 32 ms of the client's audio, a `TurnDetector` turns
those scores into the start of speech (long enough not to be a cough: it may interrupt the avatar) and the end of a
turn (long enough a pause), and a recogniser transcribes the turn. The embedded recogniser, pocketsphinx, ships its
en-us model in its wheel and decodes as the audio arrives, so partial transcripts come during the turn and the final
one a few milliseconds after its end; Whisper (a local transformers model) and an OpenAI-compatible transcription
endpoint transcribe each turn once it has ended. Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import threading
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from livetalk_ray.config import ASRConfig, ConfigError

SAMPLE_RATE = 16000  # silero-vad and pocketsphinx's en-us model both want 16 kHz; so does wav2vec2
VAD_WINDOW = 512  # samples silero-vad scores at a time at 16 kHz (32 ms)
END_HYSTERESIS = 0.15  # speech goes on while its probability stays above threshold - this (silero's own advice)
WARM_UP = "Hello, how are you today? I would like to ask you something."
MUTED_RMS = 1e-4  # -80 dBFS: below any real microphone's noise floor (a muted one sends zeros)
MAX_IDLE_DECODERS = 2  # a pocketsphinx decoder holds ~90 MB of language model: a few are kept for the next turns


class ASRError(RuntimeError):
    """Speech that could not be transcribed (endpoint failing, model missing); the message says why."""


def pcm16_bytes(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit WAV in memory (what transcription and audio-chat endpoints take)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16_bytes(samples))
    return out.getvalue()


@functools.cache
def _silero_template():
    import silero_vad

    return silero_vad.load_silero_vad()  # the jit model shipped in the wheel


class VoiceActivity:
    """silero-vad over one stream: the speech probability of each complete 32 ms window, state kept between calls."""

    def __init__(self) -> None:
        self.model = copy.deepcopy(_silero_template())  # its recurrent state is per stream: one copy (~4 MB) each
        self.model.reset_states()
        self.rest = np.zeros(0, np.float32)

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Probabilities and the windows they score; a partial window waits for the next call."""
        import torch

        x = np.concatenate([self.rest, np.asarray(samples, np.float32).reshape(-1)])
        n = len(x) // VAD_WINDOW
        windows = [x[i * VAD_WINDOW : (i + 1) * VAD_WINDOW] for i in range(n)]
        self.rest = x[n * VAD_WINDOW :]
        with torch.inference_mode():
            probs = [float(self.model(torch.from_numpy(w), SAMPLE_RATE)) for w in windows]
        return np.asarray(probs, np.float32), windows


@dataclass
class TurnDetector:
    """Speech probability per window → "start" once `start_windows` in a row are speech, "end" once `end_windows`
    in a row are clearly not (hysteresis: a dip between words does not end a turn)."""

    threshold: float
    start_windows: int
    end_windows: int
    speaking: bool = False
    run: int = 0

    @classmethod
    def from_config(cls, cfg: ASRConfig) -> TurnDetector:
        window_ms = 1000 * VAD_WINDOW / SAMPLE_RATE
        start = max(1, round(cfg.start_speech_ms / window_ms))
        return cls(cfg.vad_threshold, start, max(1, round(cfg.end_silence_ms / window_ms)))

    def step(self, probability: float) -> str | None:
        if not self.speaking:
            self.run = self.run + 1 if probability >= self.threshold else 0
            if self.run >= self.start_windows:
                self.speaking, self.run = True, 0
                return "start"
            return None
        self.run = self.run + 1 if probability < self.threshold - END_HYSTERESIS else 0
        if self.run >= self.end_windows:
            self.speaking, self.run = False, 0
            return "end"
        return None


class Utterance(Protocol):
    def feed(self, samples: np.ndarray) -> None: ...
    def partial(self) -> str | None: ...  # None: this recogniser has no partial results
    def finish(self) -> str: ...
    def abandon(self) -> None: ...


class Recognizer(Protocol):
    def begin(self) -> Utterance: ...


class PocketSphinx:
    """pocketsphinx's en-us model (in its wheel), decoding while the user speaks. Decoders are pooled: a session
    holds one only during a turn."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder
        self.idle: list = [self._new()]  # the first turn does not wait ~0.3 s for the model to load
        self.lock = threading.Lock()

    def _new(self):
        decoder = self._decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        # Cepstral mean normalisation starts from the model's defaults and adapts as speech comes; a fresh decoder's
        # first turn is recognised far worse (measured on synthetic questions: most words wrong, against a few) than
        # later ones. One spoken sentence at creation starts it from speech-like statistics.
        from livetalk_ray import espeak

        decoder.start_utt()
        decoder.process_raw(pcm16_bytes(espeak.speak(WARM_UP, sample_rate=SAMPLE_RATE)), False, True)
        decoder.end_utt()
        return decoder

    def begin(self) -> _SphinxUtterance:
        with self.lock:
            decoder = self.idle.pop() if self.idle else None
        return _SphinxUtterance(self, decoder or self._new())

    def give_back(self, decoder) -> None:
        with self.lock:
            if len(self.idle) < MAX_IDLE_DECODERS:
                self.idle.append(decoder)


class _SphinxUtterance:
    def __init__(self, owner: PocketSphinx, decoder) -> None:
        self.owner, self.decoder = owner, decoder
        decoder.start_utt()

    def feed(self, samples: np.ndarray) -> None:
        self.decoder.process_raw(pcm16_bytes(samples), False, False)

    def partial(self) -> str:
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""

    def finish(self) -> str:
        self.decoder.end_utt()
        text = self.partial()
        self.owner.give_back(self.decoder)
        return text

    def abandon(self) -> None:
        self.decoder.end_utt()
        self.owner.give_back(self.decoder)


class _WholeTurn:
    """An utterance of a recogniser that transcribes whole turns: collects the audio, transcribes at the end."""

    def __init__(self, transcribe) -> None:
        self.transcribe, self.parts = transcribe, []

    def feed(self, samples: np.ndarray) -> None:
        self.parts.append(np.asarray(samples, np.float32))

    def partial(self) -> None:
        return None

    def finish(self) -> str:
        return self.transcribe(np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32))

    def abandon(self) -> None:
        self.parts = []


class Whisper:
    """A transformers Whisper model from a local directory (`serve.asr.path`)."""

    def __init__(self, cfg: ASRConfig, device: str = "cpu") -> None:
        if not cfg.path:
            raise ConfigError("serve.asr.path is required with backend whisper (a local Whisper model directory)")
        if not Path(cfg.path).expanduser().is_dir():
            raise ConfigError(
                f"serve.asr.path {cfg.path} is not a directory (a local Whisper model, e.g. whisper-small)"
            )
        from transformers import pipeline

        self.language = cfg.language
        self.pipe = pipeline("automatic-speech-recognition", model=str(Path(cfg.path).expanduser()), device=device)
        self.lock = threading.Lock()  # one model: turns of different sessions take turns

    def begin(self) -> _WholeTurn:
        return _WholeTurn(self._transcribe)

    def _transcribe(self, audio: np.ndarray) -> str:
        if not len(audio):
            return ""
        with self.lock:
            out = self.pipe({"raw": audio, "sampling_rate": SAMPLE_RATE}, generate_kwargs={"language": self.language})
        return str(out["text"]).strip()


class OpenAITranscription:
    """`POST {endpoint}/audio/transcriptions` (multipart WAV): OpenAI, vLLM, faster-whisper servers."""

    def __init__(self, cfg: ASRConfig) -> None:
        if not cfg.endpoint:
            raise ConfigError("serve.asr.endpoint is required with backend openai (e.g. http://whisper:8000/v1)")
        self.cfg, self.url = cfg, cfg.endpoint.rstrip("/") + "/audio/transcriptions"

    def begin(self) -> _WholeTurn:
        return _WholeTurn(self._transcribe)

    def _transcribe(self, audio: np.ndarray) -> str:
        import httpx

        if not len(audio):
            return ""
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = {"model": self.cfg.model_name, "language": self.cfg.language, "response_format": "json"}
        try:
            response = httpx.post(
                self.url,
                data=data,
                files={"file": ("turn.wav", wav_bytes(audio), "audio/wav")},
                headers=headers,
                timeout=httpx.Timeout(10.0, read=60.0),
            )
        except httpx.HTTPError as exc:
            raise ASRError(f"transcription endpoint {self.url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise ASRError(f"transcription endpoint {self.url} answered {response.status_code}: {response.text[:300]}")
        try:
            return str(response.json()["text"]).strip()
        except (ValueError, KeyError, TypeError):
            raise ASRError(
                f"transcription endpoint {self.url} sent no JSON with a text: {response.text[:200]!r}"
            ) from None


def make_recognizer(cfg: ASRConfig, device: str = "cpu") -> Recognizer:
    if cfg.backend == "pocketsphinx":
        return PocketSphinx()
    if cfg.backend == "whisper":
        return Whisper(cfg, device)
    return OpenAITranscription(cfg)


@dataclass
class Listener:
    """One session's ear. `hear(samples)` → events, in order:

    - `{"event": "speech_started"}`: `start_speech_ms` of speech (the avatar may be interrupted);
    - `{"event": "partial", "text"}`: what is recognised so far (pocketsphinx only; at most every
      `partial_every_s`, and only when it changed);
    - `{"event": "final", "text", "seconds", "cut"}`: the turn ended (`end_silence_ms` of silence), or was cut at
      `max_turn_s` (`cut`: the user is still talking; the next part follows as a new turn). With `keep_audio` the
      turn's audio comes along as `audio` (float32 at 16 kHz) for an audio-native LLM;
    - `{"event": "silence", "seconds"}`: `silence_notice_s` of muted audio in a row (once per stretch): a quiet
      room is not muted, a muted or dead microphone is.
    """

    cfg: ASRConfig
    recognizer: Recognizer
    keep_audio: bool = False
    vad: VoiceActivity = field(default_factory=VoiceActivity)
    turn: TurnDetector | None = None
    preroll: deque = field(default_factory=deque)
    utterance: Utterance | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    turn_samples: int = 0
    last_partial: str = ""
    partial_at: int = 0  # turn_samples when a partial transcript was last looked at
    silent_samples: int = 0  # muted audio in a row
    # Opened again after the session's listener was lost: the user may be mid-sentence, whose start went with the
    # lost listener; that rest is not a turn of its own, so listening starts after the next pause.
    mid_turn: bool = False

    def __post_init__(self) -> None:
        self.turn = self.turn or TurnDetector.from_config(self.cfg)
        self.turn.speaking = self.mid_turn
        keep = self.cfg.preroll_ms / 1000 * SAMPLE_RATE / VAD_WINDOW + self.turn.start_windows
        self.preroll = deque(maxlen=max(1, round(keep)))

    def hear(self, samples: np.ndarray) -> list[dict]:
        events: list[dict] = []
        probs, windows = self.vad(samples)
        max_samples = self.cfg.max_turn_s * SAMPLE_RATE
        for p, window in zip(probs, windows, strict=True):
            change = self.turn.step(float(p))
            if self.mid_turn:
                self.mid_turn = change != "end"
                continue
            if self.utterance is None:
                self.preroll.append(window)
                muted = float(np.sqrt(np.mean(np.square(window)))) < MUTED_RMS
                self.silent_samples = self.silent_samples + len(window) if muted else 0
                if self.silent_samples == round(self.cfg.silence_notice_s * SAMPLE_RATE / VAD_WINDOW) * VAD_WINDOW:
                    events.append({"event": "silence", "seconds": self.silent_samples / SAMPLE_RATE})
                if change == "start":
                    self._begin(list(self.preroll))
                    self.preroll.clear()
                    events.append({"event": "speech_started"})
                continue
            self._feed(window)
            if change == "end":
                events.append(self._finish(cut=False))
            elif self.turn_samples >= max_samples:  # still talking: this part is a turn; the rest goes on
                events.append(self._finish(cut=True))
                self._begin([])
        if self.utterance is not None and self.turn_samples - self.partial_at >= self.cfg.partial_every_s * SAMPLE_RATE:
            self.partial_at = self.turn_samples
            text = self.utterance.partial()
            if text and text != self.last_partial:
                self.last_partial = text
                events.append({"event": "partial", "text": text})
        return events

    def _begin(self, windows: list[np.ndarray]) -> None:
        self.utterance, self.audio, self.turn_samples, self.last_partial = self.recognizer.begin(), [], 0, ""
        self.partial_at = 0
        for window in windows:
            self._feed(window)

    def _feed(self, window: np.ndarray) -> None:
        self.utterance.feed(window)
        self.turn_samples += len(window)
        if self.keep_audio:
            self.audio.append(window)

    def _finish(self, cut: bool) -> dict:
        utterance, self.utterance = self.utterance, None
        event = {"event": "final", "text": utterance.finish().strip(), "seconds": self.turn_samples / SAMPLE_RATE}
        event["cut"] = cut
        if self.keep_audio:
            event["audio"] = np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)
        self.audio = []
        return event

    def close(self) -> None:
        if self.utterance is not None:
            self.utterance.abandon()
            self.utterance = None
