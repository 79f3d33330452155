"""The bundled demo inputs: small, made by the project, rebuilt bit for bit, and `livetalk generate`'s defaults."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

from livetalk_ray.assets.demo import DEMO_PORTRAIT, DEMO_SPEECH, SPEECH_SAMPLE_RATE, build_demo


def test_demo_inputs_are_small_and_rebuild_identically(tmp_path):
    assert DEMO_PORTRAIT.stat().st_size + DEMO_SPEECH.stat().st_size < 300 * 1024
    portrait, speech = build_demo(tmp_path)
    assert np.array_equal(np.asarray(Image.open(portrait)), np.asarray(Image.open(DEMO_PORTRAIT)))
    rebuilt, rate = sf.read(speech, dtype="int16")
    shipped, shipped_rate = sf.read(DEMO_SPEECH, dtype="int16")
    assert rate == shipped_rate == SPEECH_SAMPLE_RATE and np.array_equal(rebuilt, shipped)
    seconds = len(shipped) / rate
    assert 4.0 < seconds < 10.0
    assert np.sqrt(np.mean((shipped / 32768.0) ** 2)) > 0.03  # speech, not silence


def test_generate_defaults_to_the_demo_inputs(tmp_path):
    """`livetalk generate --out X` with nothing else, as `./dev run` runs it: the mp4 follows the bundled speech."""
    out = tmp_path / "demo.mp4"
    exe = Path(sys.executable).with_name("livetalk")
    proc = subprocess.run(
        [str(exe), "generate", "--preset", "toy", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "bundled demo portrait and speech" in proc.stdout
    speech_s = sf.info(str(DEMO_SPEECH)).duration
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        audio_s = float(container.streams.audio[0].duration * container.streams.audio[0].time_base)
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == round(speech_s * 16)
    assert abs(audio_s - speech_s) < 0.1
    assert video.width == video.height == 64
