"""eSpeak NG speech synthesis in process, with nothing but pip: text → float32 mono samples.

The library and its voice data come from the `espeakng-loader` wheel (libespeak-ng 1.52 plus espeak-ng-data),
so no system package is needed; where that wheel is missing (a platform it has no build for), a system
libespeak-ng (`apt-get install espeak-ng`) is used instead. The few entry points we need are called through
ctypes. The PyPI bindings we looked at either shell out to the `espeak-ng` program (the apt package we want
to drop) or only phonemize, so a small wrapper of the library's synthesis API is the dependable path.

libespeak-ng keeps one global synthesizer per process: every call here holds one lock, and sets voice, rate,
pitch, volume and range afresh, so a call never inherits another caller's settings. It also keeps state it
never resets (the pitch-flutter phase, among others), so the same text comes out a few samples different on
each call in one process. Live speech does not care; where output must be a pure function of its inputs
(toy-world clips), `speak(..., isolated=True)` synthesises in a fresh interpreter, about 0.1 s a call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where samples become arrays: the fresh-process synthesiser stays light
    import numpy as np

# From speak_lib.h (stable since eSpeak 1.x).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report a failed start as -1 instead of exiting the process
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_SSML = 0x10
_PHONEMES = 0x100  # [[...]] phoneme input, as the espeak-ng program allows by default
_ENDPAUSE = 0x1000  # a pause after the last sentence, as the espeak-ng program adds by default
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_EE_OK = 0

DEFAULT_WORDS_PER_MINUTE = 175
DEFAULT_PITCH = 50
_DEFAULT_VOLUME = 100
_DEFAULT_RANGE = 50


class _Voice(ctypes.Structure):  # espeak_VOICE: a voice selected by its properties (here: its language)
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or could not speak; the message says why and what to do."""


@dataclass(frozen=True)
class LibraryInfo:
    path: str
    data_path: str | None  # None: the library's own compiled-in data folder (a system install)
    origin: str  # "espeakng-loader" or "system"


def locate_library() -> LibraryInfo:
    """The wheel's library first (the same build on every machine), else a system libespeak-ng."""
    try:
        import espeakng_loader

        return LibraryInfo(espeakng_loader.get_library_path(), espeakng_loader.get_data_path(), "espeakng-loader")
    except (ImportError, RuntimeError):
        pass
    found = ctypes.util.find_library("espeak-ng")
    if found:
        return LibraryInfo(found, None, "system")
    raise EspeakError(
        "eSpeak NG is not available: `pip install espeakng-loader` (./dev setup installs it), "
        "or install the system package espeak-ng"
    )


class _Engine:
    """The process's one libespeak-ng synthesizer (synchronous output into a Python callback)."""

    def __init__(self, info: LibraryInfo) -> None:
        try:
            lib = ctypes.CDLL(info.path)
        except OSError as exc:
            raise EspeakError(f"cannot load {info.path}: {exc}; reinstall espeakng-loader") from None
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        data = info.data_path.encode() if info.data_path else None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise EspeakError(f"eSpeak NG failed to start (voice data: {info.data_path or 'built-in path'})")
        self.lib, self.info, self.sample_rate = lib, info, int(rate)
        self._seed_noise = getattr(lib, "espeak_ng_SetRandSeed", None)  # 1.52+; older builds use libc's rand()
        if self._seed_noise is not None:
            self._seed_noise.argtypes = [ctypes.c_long]
        self._chunks: list[bytes] = []
        self._callback = _SynthCallback(self._collect)  # referenced here so it outlives every call
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples: int, _events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, 2 * num_samples))  # int16, native byte order
        return 0  # 0: go on synthesising

    def speak(self, text: str, voice: str, words_per_minute: int, pitch: int, ssml: bool) -> bytes:
        # By name first, then as a language (`en-gb+f3`), the order the espeak-ng program tries.
        by_language = _Voice(languages=voice.encode())
        if (
            self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK
            and self.lib.espeak_SetVoiceByProperties(ctypes.byref(by_language)) != _EE_OK
        ):
            raise EspeakError(f"eSpeak NG has no voice {voice!r}: use e.g. en-us, en-gb or en-us+f3")
        for parameter, value in (
            (_RATE, words_per_minute),
            (_PITCH, pitch),
            (_VOLUME, _DEFAULT_VOLUME),
            (_RANGE, _DEFAULT_RANGE),
        ):
            self.lib.espeak_SetParameter(parameter, int(value), 0)
        raw = text.encode("utf-8") + b"\0"
        flags = _CHARS_UTF8 | _PHONEMES | _ENDPAUSE | (_SSML if ssml else 0)
        if self._seed_noise is not None:  # breathy variants mix in noise, seeded from the clock at start-up
            self._seed_noise(0)
        self._chunks = []
        status = self.lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, flags, None, None)
        if status != _EE_OK or self.lib.espeak_Synchronize() != _EE_OK:
            raise EspeakError(f"eSpeak NG failed to speak {len(text)} characters (status {status})")
        chunks, self._chunks = self._chunks, []
        return b"".join(chunks)


_lock = threading.Lock()
_engine: _Engine | None = None


def _get_engine() -> _Engine:
    global _engine
    if _engine is None:
        _engine = _Engine(locate_library())
    return _engine


def available() -> bool:
    """True when eSpeak NG can be loaded in this process (pip's espeakng-loader, or a system library)."""
    try:
        with _lock:
            _get_engine()
        return True
    except EspeakError:
        return False


def _speak_pcm(text: str, voice: str, words_per_minute: int, pitch: int, ssml: bool) -> tuple[bytes, int]:
    with _lock:
        engine = _get_engine()
        return engine.speak(text, voice, words_per_minute, pitch, ssml), engine.sample_rate


def _speak_pcm_isolated(text: str, voice: str, words_per_minute: int, pitch: int, ssml: bool) -> tuple[bytes, int]:
    options = json.dumps({"voice": voice, "words_per_minute": words_per_minute, "pitch": pitch, "ssml": ssml})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "livetalk_ray.espeak", options],
            input=text.encode(),
            capture_output=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise EspeakError(f"eSpeak NG took over 120 s for {len(text)} characters") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {done.returncode}"]
        raise EspeakError(lines[-1])
    return done.stdout[4:], int.from_bytes(done.stdout[:4], "little")


def speak(
    text: str,
    *,
    voice: str = "en-us",
    words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
    pitch: int = DEFAULT_PITCH,
    ssml: bool = False,
    sample_rate: int | None = None,
    isolated: bool = False,
) -> np.ndarray:
    """`text` spoken as float32 mono in [-1, 1], at the library's rate (22050 Hz) or resampled to `sample_rate`.

    `voice` is a language voice with an optional variant (`en-gb+f3`); `ssml=True` reads `<speak>` markup
    (breaks, emphasis). Text is passed as data, never parsed as options. `isolated=True`: bit-identical output
    for identical inputs (a fresh process; see the module docstring).
    """
    import numpy as np

    synthesize = _speak_pcm_isolated if isolated else _speak_pcm
    pcm, native = synthesize(text, voice, int(words_per_minute), int(pitch), ssml)
    wave = np.frombuffer(pcm, "=i2").astype(np.float32) / 32768.0
    if sample_rate is not None and sample_rate != native and len(wave):
        from livetalk_ray.media import resample_mono  # PyAV: only when resampling, so the child process stays light

        wave = np.clip(resample_mono(wave, native, sample_rate), -1.0, 1.0)  # the filter can overshoot slightly
    return wave


def library_info() -> LibraryInfo:
    with _lock:
        return _get_engine().info


if __name__ == "__main__":  # the isolated synthesiser: options as JSON in argv[1], text on stdin, PCM on stdout
    try:
        opts = json.loads(sys.argv[1])
        pcm, rate = _speak_pcm(sys.stdin.buffer.read().decode("utf-8"), **opts)
    except EspeakError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    sys.stdout.buffer.write(rate.to_bytes(4, "little") + pcm)  # native-endian int16, read on this machine
