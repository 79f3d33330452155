"""Speech for toy clips: eSpeak NG sentences (livetalk_ray/espeak.py, from pip), else a deterministic synthetic voice.

Both paths are a pure function of the seed, and both leave pauses between phrases, so the loudness
envelope (which drives the rendered mouth) has real silences for a model to learn closed lips from.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from livetalk_ray import espeak

SpeechEngine = Literal["auto", "espeak", "synthetic"]

SENTENCES = (
    "The morning train was late again today.",
    "Please put the blue cup on the top shelf.",
    "We walked along the river until sunset.",
    "My neighbour grows tomatoes on her balcony.",
    "Turn left at the bakery and keep going.",
    "The meeting has moved to Thursday afternoon.",
    "I think the kettle has just boiled.",
    "Could you read that number back to me?",
    "The library closes early on Sundays.",
    "A small dog barked at the postman.",
    "We need more paper for the printer.",
    "The soup tastes better the next day.",
    "She painted the fence a bright yellow.",
    "Nobody expected the storm to last so long.",
    "Let me check the weather before we leave.",
    "The children built a castle out of sand.",
    "He forgot his umbrella at the station.",
    "This recipe needs two eggs and some flour.",
    "The museum has a new exhibition on whales.",
    "I will call you back in five minutes.",
    "The garden looks lovely after the rain.",
    "Our team won the match by a single goal.",
    "Remember to water the plants on Friday.",
    "The bus stop is just around the corner.",
    "They are planning a trip to the mountains.",
    "Can you hear the birds outside the window?",
    "The bread is still warm from the oven.",
    "I found an old photograph in the attic.",
    "Every evening we play a game of cards.",
    "The lamp in the hallway needs a new bulb.",
    "She speaks three languages quite fluently.",
    "Let us meet at the cafe near the park.",
    "The river was too cold for swimming.",
    "My brother fixed the bicycle by himself.",
    "Please close the door when you go out.",
    "The concert starts at half past seven.",
    "We saw a rainbow over the hills yesterday.",
    "The shop on the corner sells fresh fish.",
    "I would like a glass of water, please.",
    "The clock in the kitchen is five minutes fast.",
    "Our cat sleeps on the sofa all day long.",
    "The new bridge will open next spring.",
    "He wrote a long letter to his grandmother.",
    "The path through the forest is quite muddy.",
    "Thank you for helping me carry the boxes.",
    "The printer on the second floor is broken.",
    "We ordered pizza and watched a film.",
    "The sky turned orange as the sun went down.",
    "Keep the receipt in case it does not fit.",
    "The baby finally fell asleep after lunch.",
)
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 5))
# (F1, F2, F3) in Hz of a few vowels, for the synthetic fallback's formant colouring.
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
    (660, 1720, 2410),
)


def espeak_available() -> bool:
    return espeak.available()


def _fit(wave: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[: min(n, len(wave))] = wave[:n]
    return out


def _espeak(text: str | None, rng: np.random.Generator, seconds: float, sample_rate: int) -> np.ndarray:
    voice = f"{ESPEAK_VOICES[rng.integers(len(ESPEAK_VOICES))]}+{ESPEAK_VARIANTS[rng.integers(len(ESPEAK_VARIANTS))]}"
    speed = int(rng.integers(130, 186))  # words per minute
    pitch = int(rng.integers(25, 76))
    lead = rng.uniform(0.05, 0.35)
    order = rng.permutation(len(SENTENCES))
    if text is None:
        # Enough sentences for the clip at this speed (~5.5 chars per word incl. space), plus a margin.
        chars_needed = 1.4 * seconds * speed / 60 * 5.5
        chosen: list[str] = []
        while sum(len(s) for s in chosen) < chars_needed:
            chosen.append(SENTENCES[order[len(chosen) % len(order)]])
        # SSML breaks: real pauses between sentences, so the envelope (and the mouth) rests.
        body = "".join(f'{s}<break time="{int(rng.integers(150, 550))}ms"/>' for s in chosen)
        wave = espeak.speak(
            f"<speak>{body}</speak>",
            voice=voice,
            words_per_minute=speed,
            pitch=pitch,
            ssml=True,
            sample_rate=sample_rate,
            isolated=True,  # bit-identical per seed
        )
    else:
        wave = espeak.speak(
            text, voice=voice, words_per_minute=speed, pitch=pitch, sample_rate=sample_rate, isolated=True
        )
    wave = np.concatenate([np.zeros(int(lead * sample_rate), np.float32), wave])
    peak = float(np.abs(wave).max()) if len(wave) else 0.0
    return _fit(wave * (0.6 / peak if peak > 0 else 1.0), int(round(seconds * sample_rate)))


def _syllable(rng: np.random.Generator, f0: float, dur: float, sample_rate: int) -> np.ndarray:
    """A voiced syllable: harmonics of a gliding f0, weighted by a vowel's formants, with a soft envelope."""
    n = int(dur * sample_rate)
    t = np.arange(n) / sample_rate
    glide = f0 * (1.0 + rng.uniform(-0.12, 0.12) * t / dur + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(glide) / sample_rate
    formants = np.asarray(_VOWELS[rng.integers(len(_VOWELS))], np.float64) * rng.uniform(0.9, 1.1)
    k = np.arange(1, int(4500 // (f0 * 1.15)) + 1)
    gains = (1.0 / (1.0 + ((k[:, None] * f0 - formants[None]) / 110.0) ** 2)) @ np.array([1.0, 0.6, 0.25])
    voiced = (gains[:, None] * np.sin(k[:, None] * phase[None])).sum(axis=0) / gains.sum()
    env = np.ones(n)
    a, d = min(n, int(0.025 * sample_rate)), min(n, int(0.09 * sample_rate))
    env[:a] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, a))
    env[n - d :] *= 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, d))
    out = voiced * env * rng.uniform(0.35, 1.0)
    if rng.random() < 0.6:  # a consonant: a short burst of high-passed noise at the onset
        m = min(n, int(rng.uniform(0.03, 0.06) * sample_rate))
        noise = np.diff(rng.standard_normal(m + 1))
        out[:m] += 0.15 * noise * np.hanning(m)
    return out


def _synthetic(rng: np.random.Generator, seconds: float, sample_rate: int) -> np.ndarray:
    """Phrases of 3-9 syllables at ~4-6 syllables/s separated by 0.2-0.6 s pauses, from one seeded voice."""
    total = int(round(seconds * sample_rate))
    f0_base = rng.uniform(95.0, 230.0)
    out = np.zeros(total + sample_rate, np.float64)  # one second of slack for the last syllable
    pos = int(rng.uniform(0.05, 0.35) * sample_rate)
    while pos < total:
        syllables = int(rng.integers(3, 10))
        for i in range(syllables):
            f0 = f0_base * (1.0 - 0.12 * i / syllables)  # declination across the phrase
            syl = _syllable(rng, f0, rng.uniform(0.12, 0.26), sample_rate)
            end = min(len(out), pos + len(syl))
            out[pos:end] += syl[: end - pos]
            pos = end + int(rng.uniform(0.03, 0.1) * sample_rate)
            if pos >= total:
                break
        pos += int(rng.uniform(0.2, 0.6) * sample_rate)
    out = out[:total]
    peak = float(np.abs(out).max()) if total else 0.0
    return (out * (0.6 / peak if peak > 0 else 1.0)).astype(np.float32)


def synthesize_speech(
    text: str | None,
    seed: int,
    seconds: float,
    sample_rate: int = 16000,
    *,
    engine: SpeechEngine = "auto",
) -> np.ndarray:
    """Mono float32 speech of exactly `seconds` (padded with silence or trimmed), deterministic per seed.

    engine="auto" uses eSpeak NG when it loads (voice, speed, pitch and sentences from the seed; `text`
    overrides the sentences), else the synthetic voice, which ignores `text`. "espeak" requires it.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))  # stream 3: speech
    use_espeak = engine == "espeak" or (engine == "auto" and espeak_available())
    if use_espeak:
        if not espeak_available():
            raise RuntimeError("engine='espeak' but eSpeak NG cannot be loaded: `pip install espeakng-loader`")
        return _espeak(text, rng, seconds, sample_rate)
    return _synthetic(rng, seconds, sample_rate)


def speech_envelope(wave: np.ndarray, fps: float, sample_rate: int = 16000) -> np.ndarray:
    """Loudness per video frame [T], T = round(duration x fps), in [0, 1]; frame k is centred at k / fps.

    RMS over a Hann window 1.5 frames wide, lightly smoothed, divided by its 95th percentile and mildly
    compressed (power 0.8); near-silence maps to exactly 0. The window is short on purpose: the envelope
    (and so the rendered mouth) dips between syllables as a speaking mouth does, instead of hovering open.
    """
    wave = np.asarray(wave, np.float64).reshape(-1)
    hop = sample_rate / fps
    num = max(1, int(round(len(wave) / hop)))
    half = max(1, int(round(0.75 * hop)))
    padded = np.pad(wave, (half, half + int(np.ceil(hop))))
    win = np.hanning(2 * half + 2)[1:-1]
    win /= win.sum()
    rms = np.empty(num)
    for k in range(num):
        c = int(round(k * hop)) + half  # centre of frame k in the padded signal
        seg = padded[c - half : c + half]
        rms[k] = np.sqrt(np.dot(seg * seg, win))
    if num >= 3:
        rms = np.convolve(np.pad(rms, 1, mode="edge"), [0.2, 0.6, 0.2], mode="valid")
    ref = float(np.percentile(rms, 95))
    if ref <= 1e-6:
        return np.zeros(num, np.float32)
    env = np.clip(rms / ref, 0.0, 1.0) ** 0.8
    env[env < 0.05] = 0.0
    return env.astype(np.float32)


def openness_from_envelope(envelope: np.ndarray, lag_frames: int = 0) -> np.ndarray:
    """Mouth openness for the renderer: the envelope delayed by `lag_frames` (negative = the mouth leads)."""
    env = np.asarray(envelope, np.float32)
    if lag_frames == 0 or len(env) == 0:
        return env.copy()
    shifted = np.roll(env, lag_frames)
    if lag_frames > 0:
        shifted[:lag_frames] = env[0]
    else:
        shifted[lag_frames:] = env[-1]
    return shifted
