"""Pictures of a long-stream evaluation (eval/longform.py): curves per second and a frame strip per model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from livetalk_ray.eval.longform import LIPSYNC_WINDOW_S, OTHER_PERSON


def plot_curves(result: dict, path: Path) -> None:
    """Identity distance per second (top) and lip-sync per window (bottom), one line per model (mean over
    people); students without sinks dashed, in their model's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=100, sharex=True)
    colours: dict[str, str] = {}
    for name, per_talk in result["curves"].items():
        base = name.removesuffix(" (no sinks)")
        style = "--" if base != name else "-"
        # a lost face (null) is a gap in the line
        ident = np.array([[np.nan if d is None else d for d in t["identity"]] for t in per_talk], np.float64)
        seconds = np.arange(1, ident.shape[1] + 1)
        with warnings.catch_warnings():  # a second no stream had a face in: the mean is NaN, a gap
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(ident, axis=0)
        (line,) = top.plot(seconds, mean, style, lw=1.4, label=name, color=colours.get(base))
        colours.setdefault(base, line.get_color())
        lips = np.array([t["lipsync"] for t in per_talk], np.float64).mean(axis=0)
        mids = (np.arange(len(lips)) + 0.5) * LIPSYNC_WINDOW_S
        bottom.plot(mids, lips, style + "o", ms=3, lw=1.2, color=colours[base], label=name)
    top.axhline(0.10, color="grey", lw=0.8, ls=":")
    top.axhline(OTHER_PERSON, color="red", lw=0.8, ls=":")
    top.text(0.5, OTHER_PERSON, " another person", color="red", va="bottom", fontsize=8)
    top.set_ylabel("identity distance to the reference")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, ncol=2)
    bottom.set_ylabel(f"lip-sync ({LIPSYNC_WINDOW_S} s windows)")
    bottom.set_xlabel("second of the stream")
    bottom.grid(alpha=0.3)
    people = ", ".join(result["people"])
    fig.suptitle(f"Held-out people ({people}), {result['seconds']:.0f} s each: mean over people", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_strips(videos: dict[str, np.ndarray], reference: np.ndarray, fps: int, path: Path) -> None:
    """One row per model: the reference, then frames at 0.5 s, 1 s, 5 s, 10 s, 20 s, ... of its video, with
    the model's name drawn on the row."""
    from PIL import Image, ImageDraw

    longest = max(len(v) for v in videos.values()) / fps
    marks = [s for s in (0.5, 1, 5, 10, 20, 30, 45, 60, 120, 300) if s <= longest]
    h, w, _ = reference.shape
    label_w, gap = 110, 2
    rows = []
    for name, frames in videos.items():
        tiles = [reference] + [frames[min(len(frames) - 1, int(s * fps) - 1)] for s in marks]
        row = np.full((h, label_w + len(tiles) * (w + gap), 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            x = label_w + i * (w + gap)
            row[:, x : x + w] = tile
        img = Image.fromarray(row)
        ImageDraw.Draw(img).text((4, h // 2 - 6), name, fill=(0, 0, 0))
        rows.append(np.asarray(img))
    header = Image.new("RGB", (rows[0].shape[1], 14), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for i, label in enumerate(["ref", *(f"{s:g} s" for s in marks)]):
        draw.text((label_w + i * (w + gap) + 2, 1), label, fill=(0, 0, 0))
    Image.fromarray(np.concatenate([np.asarray(header), *rows])).save(path)
