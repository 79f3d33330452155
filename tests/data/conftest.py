"""Data-pipeline fixtures: real clips from ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_portrait_clip(
    portrait: Path,
    speech: Path,
    out_dir: Path,
    name: str = "portrait_talk",
    size: int = 96,
    fps: int = 16,
    seconds: float = 3.0,
) -> Path:
    """A real-world clip: the shared portrait with a slow push-in and sway, and the shared real speech."""
    from PIL import Image

    from livetalk_ray.media import Mp4Writer, load_audio

    image = Image.open(portrait).convert("RGB").resize((size * 2, size * 2))
    wave = load_audio(speech)
    frames = []
    for k in range(round(seconds * fps)):
        zoom = 1.0 + 0.1 * k / (seconds * fps)
        side = int(size * 2 / zoom)
        dx = int(6 * np.sin(k / 5))
        left = (size * 2 - side) // 2 + dx
        crop = image.crop((left, (size * 2 - side) // 2, left + side, (size * 2 + side) // 2))
        frames.append(np.asarray(crop.resize((size, size))))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = Mp4Writer(out_dir / f"{name}.mp4", fps, size, size, 16000)
    writer.write(np.stack(frames), wave[: round(seconds * 16000)])
    writer.close()
    (out_dir / f"{name}.json").write_text(json.dumps({"caption": "A woman looking at the camera. #portrait 4K"}))
    return out_dir / f"{name}.mp4"
