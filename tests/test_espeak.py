from __future__ import annotations

import shutil
import subprocess
import threading

import numpy as np
import pytest

from livetalk_ray import espeak
from livetalk_ray.media import load_audio

# Duration (s) and RMS at 16 kHz of today's serving output, before this module existed: Debian's espeak-ng 1.51
# program, `espeak-ng -b 1 -v en-us -s 165 -w out.wav` with the text on stdin, read with media.load_audio.
CLI_1_51 = {
    "Paris is the capital of France.": (2.113, 0.0782),
    "Hello there. The Eiffel Tower was finished in 1889 and is three hundred metres tall.": (6.795, 0.0930),
    "Café au lait, s'il vous plaît.": (2.530, 0.0881),
}


def _rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))


@pytest.mark.parametrize("text", sorted(CLI_1_51))
def test_same_duration_and_energy_as_the_espeak_ng_program(text: str) -> None:
    wave = espeak.speak(text, voice="en-us", words_per_minute=165, sample_rate=16000)
    seconds, rms = CLI_1_51[text]
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.abs(wave).max() <= 1.0
    assert len(wave) / 16000 == pytest.approx(seconds, rel=0.02)
    assert _rms(wave) == pytest.approx(rms, rel=0.05)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="no espeak-ng program to compare with live")
def test_matches_the_installed_program_for_a_variant_voice(tmp_path) -> None:
    text = "We walked along the river until sunset."
    path = tmp_path / "cli.wav"
    cmd = ["espeak-ng", "-b", "1", "-v", "en-gb-scotland+m3", "-s", "180", "-p", "30", "-w", str(path)]
    subprocess.run(cmd, input=text.encode(), check=True, capture_output=True)
    cli = load_audio(path, 16000)
    ours = espeak.speak(text, voice="en-gb-scotland+m3", words_per_minute=180, pitch=30, sample_rate=16000)
    assert len(ours) == pytest.approx(len(cli), rel=0.02)
    assert _rms(ours) == pytest.approx(_rms(cli), rel=0.05)


def test_native_rate_voices_rate_pitch_and_ssml() -> None:
    native = espeak.speak("Good morning.")
    assert espeak.library_info().origin in ("espeakng-loader", "system")
    slow = espeak.speak("Good morning.", words_per_minute=100)
    assert len(slow) > 1.3 * len(native)
    # A call never inherits the previous call's settings (the library keeps them globally); in one process the
    # same call differs by a few samples (pitch-flutter phase), so compare durations.
    assert len(espeak.speak("Good morning.")) == pytest.approx(len(native), rel=0.01)
    high = espeak.speak("Good morning.", pitch=80)
    assert len(espeak.speak("Good morning.")) == pytest.approx(len(native), rel=0.01)
    assert _pitch_hz(high) > 1.2 * _pitch_hz(native)
    for voice in ("en-gb", "en-us+f3", "en-gb-x-rp+m7"):
        assert _rms(espeak.speak("Good morning.", voice=voice)) > 0.02
    plain = espeak.speak("One. Two.", ssml=True, sample_rate=16000)
    paused = espeak.speak('<speak>One.<break time="1500ms"/>Two.</speak>', ssml=True, sample_rate=16000)
    assert len(paused) - len(plain) > 0.9 * 16000


def _pitch_hz(wave: np.ndarray, rate: int = 22050) -> float:
    """Median fundamental over voiced 40 ms frames, from the autocorrelation peak in 60-400 Hz."""
    frame, found = int(0.04 * rate), []
    for start in range(0, len(wave) - frame, frame):
        x = wave[start : start + frame].astype(np.float64)
        if np.sqrt(np.mean(x * x)) < 0.05:
            continue
        ac = np.correlate(x, x, "full")[frame - 1 :]
        lo, hi = rate // 400, rate // 60
        found.append(rate / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(found))


def test_isolated_calls_are_bit_identical() -> None:
    a = espeak.speak("Good morning.", voice="en-gb+f3", pitch=60, isolated=True, sample_rate=16000)
    espeak.speak("Something else entirely.")  # this process's synthesizer state moves on; the next call is unaffected
    b = espeak.speak("Good morning.", voice="en-gb+f3", pitch=60, isolated=True, sample_rate=16000)
    assert np.array_equal(a, b) and _rms(a) > 0.02
    with pytest.raises(espeak.EspeakError, match="no voice 'zz-missing'"):
        espeak.speak("Hello.", voice="zz-missing", isolated=True)


def test_unknown_voice_is_a_clear_error_and_the_engine_recovers() -> None:
    with pytest.raises(espeak.EspeakError, match="no voice 'zz-missing'"):
        espeak.speak("Hello.", voice="zz-missing")
    assert _rms(espeak.speak("Hello.")) > 0.02


def test_concurrent_callers_each_get_their_own_speech() -> None:
    texts = ["Hello there.", "The Eiffel Tower was finished in 1889.", "Yes."]
    expected = [espeak.speak(t, words_per_minute=150 + 10 * i) for i, t in enumerate(texts)]
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        for _ in range(5):
            got[i] = espeak.speak(texts[i], words_per_minute=150 + 10 * i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):  # each caller got its own text at its own rate (not another thread's)
        assert len(got[i]) == pytest.approx(len(expected[i]), rel=0.01)


def test_missing_library_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_loader(name, *args, **kwargs):
        if name == "espeakng_loader":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_loader)
    monkeypatch.setattr(espeak.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(espeak.EspeakError, match="pip install espeakng-loader"):
        espeak.locate_library()
