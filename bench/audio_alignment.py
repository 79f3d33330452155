"""Audio-to-frame alignment: LiveTalk's whole-clip stretch against our streaming (time-exact) alignment.

    .venv/bin/python bench/audio_alignment.py [--fps 16] [--out bench/results/audio_alignment.json]

LiveTalk's released inference encodes a clip's whole wave at once and stretches wav2vec2's ~50 Hz CNN features
onto the clip's N video frames with `align_corners=True`: frame k reads CNN position k·(P-1)/(N-1), where P
depends on the clip's total length. A stream cannot know that length, so livetalk-ray reads the CNN features at
each frame's exact time k/fps (`AudioEncoder.encode_frames`). This script computes, from wav2vec2's convolution
geometry (the same for every wav2vec2-base/large checkpoint), where each frame's audio window is centred under
both conventions, and reports the difference in video frames for 5 s, 30 s and 5 min of speech, with and
without the constant shift `audio.frame_offset_s` that brings the two closest over a training clip.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from livetalk_ray.config import load_config

CONV_KERNEL, CONV_STRIDE = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)  # wav2vec2's feature encoder


def cnn_geometry() -> tuple[int, int]:
    receptive, hop = 1, 1
    for k, s in zip(CONV_KERNEL, CONV_STRIDE, strict=True):
        receptive += (k - 1) * hop
        hop *= s
    return receptive, hop


def cnn_frames(samples: int) -> int:
    length = samples
    for k, s in zip(CONV_KERNEL, CONV_STRIDE, strict=True):
        length = (length - k) // s + 1
    return length


def offsets(seconds: float, fps: float, sample_rate: int, shift_s: float = 0.0) -> np.ndarray:
    """Per video frame: (LiveTalk's window centre - ours) in video frames, for a clip of `seconds` of audio."""
    receptive, hop = cnn_geometry()
    frames = round(seconds * fps) + 1  # LiveTalk: 4F-3 frames span (4F-4)/fps seconds
    positions = cnn_frames(round(seconds * sample_rate)) - 1
    k = np.arange(frames, dtype=np.float64)
    stretched = (k * positions / (frames - 1)) * hop + receptive / 2  # CNN window centre, samples
    exact = (k / fps + shift_s) * sample_rate  # ours: the window centred on the frame's time (+ shift)
    return (stretched - exact) / sample_rate * fps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fps", type=float, default=None, help="video frame rate (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audio_alignment.json")
    args = parser.parse_args()
    cfg = load_config("wan-1.3b")
    fps, sr = args.fps or cfg.video.fps, cfg.audio.sample_rate
    train_seconds = (cfg.data.num_frames - 1) / fps
    # the constant shift that minimises the mean |offset| over a training clip (the median of its offsets)
    best_shift = float(np.median(offsets(train_seconds, fps, sr))) / fps
    console = Console()
    table = Table(title=f"LiveTalk stretch - livetalk-ray exact time, in video frames ({fps:g} fps)")
    for col in ("speech", "shift", "first frame", "last frame", "mean |offset|", "max |offset|"):
        table.add_column(col, justify="right")
    rows = []
    for seconds in (5.0, 30.0, 300.0):
        for shift in (0.0, best_shift):
            o = offsets(seconds, fps, sr, shift)
            row = {
                "seconds": seconds,
                "shift_s": shift,
                "first": float(o[0]),
                "last": float(o[-1]),
                "mean_abs": float(np.abs(o).mean()),
                "max_abs": float(np.abs(o).max()),
            }
            rows.append(row)
            table.add_row(
                f"{seconds:g} s", f"{shift * 1000:+.1f} ms", *(f"{row[k]:+.3f}" for k in ("first", "last")),
                *(f"{row[k]:.3f}" for k in ("mean_abs", "max_abs")),
            )  # fmt: skip
    console.print(table)
    receptive, hop = cnn_geometry()
    result = {
        "what": __doc__.strip().splitlines()[0],
        "fps": fps,
        "sample_rate": sr,
        "cnn": {"receptive_field_samples": receptive, "hop_samples": hop},
        "training_clip_seconds": train_seconds,
        "best_constant_shift_s": best_shift,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
