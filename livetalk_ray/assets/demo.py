"""The demo inputs that ship in the package: a toy-world portrait and a few seconds of synthesised speech.

`livetalk generate` (and so `./dev run`) uses them when no `--image` / `--audio` is given, so a fresh clone
needs nothing beside it. Both are made by the project: the portrait is the toy world's identity 11 (the serving
page's default portrait, "ada"), the speech is eSpeak NG; `python -m livetalk_ray.assets.demo` rebuilds them
bit for bit.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_PORTRAIT = DEMO_DIR / "portrait.png"
DEMO_SPEECH = DEMO_DIR / "speech.flac"

PORTRAIT_IDENTITY = 11
PORTRAIT_SIZE = 256
SPEECH_TEXT = (
    "Hello! I am a toy avatar, made by live talk ray. "
    "My lips follow whatever I say, and I can talk with you in the browser."
)
SPEECH_VOICE = "en-us"
SPEECH_WORDS_PER_MINUTE = 165
SPEECH_SAMPLE_RATE = 16000


def build_demo(dest: Path = DEMO_DIR) -> tuple[Path, Path]:
    """Render the portrait and synthesise the speech into `dest`; the same files every time."""
    import soundfile as sf
    from PIL import Image

    from livetalk_ray import espeak
    from livetalk_ray.toyworld.render import render_reference, sample_identity

    dest.mkdir(parents=True, exist_ok=True)
    portrait = dest / DEMO_PORTRAIT.name
    image = render_reference(sample_identity(PORTRAIT_IDENTITY), PORTRAIT_SIZE, PORTRAIT_SIZE)
    Image.fromarray(image).save(portrait, format="PNG", optimize=True)
    wave = espeak.speak(
        SPEECH_TEXT,
        voice=SPEECH_VOICE,
        words_per_minute=SPEECH_WORDS_PER_MINUTE,
        sample_rate=SPEECH_SAMPLE_RATE,
        isolated=True,  # bit-identical on every rebuild
    )
    speech = dest / DEMO_SPEECH.name
    sf.write(speech, wave, SPEECH_SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return portrait, speech


if __name__ == "__main__":
    for path in build_demo():
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
