"""Measure lip-sync and identity on toy-world frames, real or generated, from pixels alone.

The face is found per frame by colour: the skin colour is the median of the frame's centre, the face is the
skin-coloured region connected to it, and an ellipse fitted to that region's row edges below the hairline
gives the face centre and size (hair hides the forehead; the neck is shadowed, so the chin stays visible).
The mouth is the dark region in the lower face; its height at the tallest columns, over the face half-width,
is the openness. Nothing here knows the identity or the truth: it works on any frames that look the part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livetalk_ray.toyworld.render import MOUTH_OPEN_H
from livetalk_ray.toyworld.speech import speech_envelope

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class FaceGeometry:
    """Face ellipse in pixels; `ok` is False when no face-like skin region was found."""

    cx: float
    cy: float
    rx: float
    ry: float
    skin: np.ndarray  # [3] float32 RGB
    background: np.ndarray  # [3]
    ok: bool


@dataclass(frozen=True)
class LipSync:
    score: float  # Pearson correlation of mouth openness and speech envelope at the best lag
    lag: int  # frames; > 0 means the mouth moves after the sound
    per_lag: dict[int, float]


def _row_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last column of each row where two neighbouring pixels are skin (-1 where none)."""
    pair = mask[:, :-1] & mask[:, 1:]  # ignores isolated skin-coloured specks
    has = pair.any(axis=1)
    first = np.where(has, pair.argmax(axis=1), -1)
    last = np.where(has, pair.shape[1] - pair[:, ::-1].argmax(axis=1), -1)  # index of the right pixel
    return first, last


def _connected(mask: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The part of `mask` 4-connected to its pixels inside the box: the face, without skin-coloured
    blends elsewhere (e.g. where a shirt meets the background). Geodesic dilation, no scipy needed."""
    region = np.zeros_like(mask)
    region[y0 : y1 + 1, x0 : x1 + 1] = mask[y0 : y1 + 1, x0 : x1 + 1]
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _coverage(inside: np.ndarray, edge: np.ndarray, outside: np.ndarray, fallback: float = 0.5) -> np.ndarray:
    """Fraction of an anti-aliased edge pixel covered by the inside colour (sub-pixel face width).

    Only trusted when the edge pixel lies near the inside-outside colour segment; where three colours meet
    (e.g. skin, a thin rim of hair and background) the projection is meaningless and 0.5 is used.
    """
    d = inside - outside
    dd = np.maximum((d * d).sum(-1), 1.0)
    c = np.clip(((edge - outside) * d).sum(-1) / dd, 0.0, 1.0)
    off = np.linalg.norm(edge - outside - c[..., None] * d, axis=-1)
    return np.where(off < 0.2 * np.sqrt(dd) + 4.0, c, fallback)


def face_geometry(frame: np.ndarray) -> FaceGeometry:
    """Face ellipse and skin/background colours of one frame [H, W, 3] (uint8 or float, 0-255)."""
    img = np.asarray(frame, np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[: int(0.7 * h), 0], img[: int(0.7 * h), -1]])
    background = np.median(border, axis=0)
    centre = img[int(0.40 * h) : int(0.58 * h) + 1, int(0.40 * w) : int(0.60 * w) + 1].reshape(-1, 3)
    skin = np.median(centre, axis=0)
    # Tolerance grows with brightness (codecs and models err more on bright colours) but stays below the
    # neck's shadow (34 % darker) and the palette's minimum distance to hair/background.
    tau = float(np.clip(0.2 * np.linalg.norm(skin) + 6.0, 22.0, 45.0))
    near = np.linalg.norm(centre - skin, axis=1) < tau
    if near.any():
        skin = centre[near].mean(axis=0)
    mask = _connected(
        np.linalg.norm(img - skin, axis=-1) < tau, int(0.40 * h), int(0.58 * h), int(0.4 * w), int(0.6 * w)
    )
    first, last = _row_edges(mask)
    rows = np.nonzero(first >= 0)[0]
    bad = FaceGeometry(w / 2, h / 2, w / 4, h / 3, skin, background, False)
    if len(rows) < 6:
        return bad
    # Continuous edges (pixel j spans [j, j+1)), refined by the partially covered pixels just outside.
    r_idx = np.arange(h)
    lf, rl = np.clip(first - 1, 0, w - 1), np.clip(last + 1, 0, w - 1)
    lo, ro = np.clip(first - 2, 0, w - 1), np.clip(last + 2, 0, w - 1)
    left = first - _coverage(skin, img[r_idx, lf], img[r_idx, lo])
    right = last + 1 + _coverage(skin, img[r_idx, rl], img[r_idx, ro])
    span = np.where(first >= 0, right - left, 0.0)
    peak = float(np.sort(span)[-2])  # second largest: one bad row cannot set the scale
    if peak < 4:
        return bad
    # Fit an axis-aligned ellipse x^2 + A y^2 + B x + C y + D = 0 (linear least squares) to the run edges
    # from the first nearly-widest row down to the chin: above it, hair hides the face outline.
    start = int(np.argmax(span >= 0.9 * peak))
    narrow = np.nonzero(span[start:] < 0.2 * peak)[0]
    stop = start + (int(narrow[0]) if len(narrow) else h - start)  # contiguous: skip stray specks below
    sel = (r_idx >= start) & (r_idx < stop)
    if sel.sum() < 4:
        return bad
    ys = np.concatenate([r_idx[sel], r_idx[sel]]) + 0.5  # row centres
    xs = np.concatenate([left[sel], right[sel]]).astype(np.float64)
    design = np.stack([ys * ys, xs, ys, np.ones_like(ys)], axis=1)
    (a, b, c, d), *_ = np.linalg.lstsq(design, -xs * xs, rcond=None)
    if a <= 0:
        return bad
    cx, cy = -b / 2, -c / (2 * a)
    rx2 = cx * cx + a * cy * cy - d
    if rx2 <= 0:
        return bad
    rx, ry = float(np.sqrt(rx2)), float(np.sqrt(rx2 / a))
    cx, cy = float(cx), float(cy)
    ok = 0 <= cy < h and 0.3 * rx < ry < 3 * rx
    return FaceGeometry(cx, float(cy), rx, ry, skin, background, bool(ok))


def _mouth_height(img: np.ndarray, g: FaceGeometry) -> float:
    """Vertical extent (px) of the dark mouth interior at its tallest columns."""
    h, w, _ = img.shape
    y0, y1 = int(np.floor(g.cy + 0.2 * g.ry)), int(np.ceil(g.cy + 0.92 * g.ry))
    x0, x1 = int(np.floor(g.cx - 0.6 * g.rx)), int(np.ceil(g.cx + 0.6 * g.rx))
    y0, y1, x0, x1 = max(0, y0), min(h, y1 + 1), max(0, x0), min(w, x1 + 1)
    if y1 <= y0 or x1 <= x0:
        return 0.0
    luma = img[y0:y1, x0:x1] @ _LUMA
    ls = float(g.skin @ _LUMA)
    # Soft darkness: 0 for skin and lips (>= 60 % of skin luma), 1 for the near-black interior.
    dark = np.clip((0.6 * ls - luma) / max(0.6 * ls - min(0.3 * ls, 35.0), 1.0), 0.0, 1.0)
    # Only inside the face: the window's lower corners can reach dark hair or shirt beside the chin.
    yy = (np.arange(y0, y1)[:, None] + 0.5 - g.cy) / g.ry
    xx = (np.arange(x0, x1)[None, :] + 0.5 - g.cx) / g.rx
    dark *= (xx * xx + yy * yy) < 0.85
    cols = np.sort(dark.sum(axis=0))[::-1]
    k = max(1, int(round(0.3 * g.rx)))
    return float(cols[:k].mean())


def mouth_openness(frames: np.ndarray) -> np.ndarray:
    """Mouth opening per frame [T] from pixels: ~0.1 for closed lips, ~1 for the toy world's widest mouth.

    The opening height is divided by the face half-width, so head scale and frame resolution cancel.
    Frames where no face is found give NaN.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    out = np.full(len(frames), np.nan, np.float32)
    for i, frame in enumerate(frames):
        img = frame.astype(np.float32)
        g = face_geometry(img)
        if g.ok:
            out[i] = _mouth_height(img, g) / g.rx / MOUTH_OPEN_H
    return out


def _median_colour(pixels: np.ndarray, avoid: list[np.ndarray], tol: float = 30.0) -> np.ndarray:
    keep = np.ones(len(pixels), bool)
    for colour in avoid:
        keep &= np.linalg.norm(pixels - colour, axis=1) > tol
    chosen = pixels[keep] if keep.sum() >= 3 else pixels
    return np.median(chosen, axis=0) if len(chosen) else np.zeros(3, np.float32)


def _frame_descriptor(frame: np.ndarray) -> np.ndarray | None:
    img = np.asarray(frame, np.float32)
    h, w, _ = img.shape
    g = face_geometry(img)
    if not g.ok:
        return None

    def box(y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        ya, yb = int(np.clip(round(y0), 0, h - 1)), int(np.clip(round(y1), 1, h))
        xa, xb = int(np.clip(round(x0), 0, w - 1)), int(np.clip(round(x1), 1, w))
        return img[ya : max(yb, ya + 1), xa : max(xb, xa + 1)].reshape(-1, 3)

    hair = _median_colour(box(g.cy - 1.0 * g.ry, g.cy - 0.68 * g.ry, g.cx - 0.4 * g.rx, g.cx + 0.4 * g.rx), [g.skin])
    shirt = np.median(box(h - 0.04 * h - 1, h, 0.4 * w, 0.6 * w), axis=0)
    # Hair style, coarsely: how much hair hangs beside the lower face (long hair), and how low the hairline
    # comes on the forehead (a fringe). Eye colour is left out: at 64 px the iris is 1-2 blended pixels and
    # its noise between frames matched its spread between people.
    beside = np.concatenate(
        [
            box(g.cy + 0.35 * g.ry, g.cy + 0.75 * g.ry, g.cx - 1.12 * g.rx, g.cx - 0.95 * g.rx),
            box(g.cy + 0.35 * g.ry, g.cy + 0.75 * g.ry, g.cx + 0.95 * g.rx, g.cx + 1.12 * g.rx),
        ]
    )
    long_hair = float(np.clip(((np.linalg.norm(beside - hair, axis=1) < 40).mean() - 0.2) / 0.4, 0.0, 1.0))
    # Hairline: count the skin (soft, by projection between hair and skin colour) in a thin strip between
    # the eyes, from the top of the frame down to the face centre.
    x0, x1 = int(round(g.cx - 0.08 * g.rx)), int(round(g.cx + 0.08 * g.rx)) + 1
    strip = img[: max(0, int(round(g.cy))), max(0, x0) : min(w, x1)].reshape(-1, 3)
    skin_px = _coverage(g.skin, strip, hair, fallback=0.0)  # background and eyebrows are neither: 0
    hairline = -float(skin_px.sum()) / max(1, min(w, x1) - max(0, x0)) / g.ry
    colours = np.concatenate([g.background, g.skin, hair, shirt]) / 255.0
    # Weights: shape cues are noisier than colours (fit error, tilt), so they count half.
    shape = np.array([0.5 * (g.ry / g.rx - 1.0), 2.0 * g.rx / h, 0.5 * long_hair, 0.5 * hairline], np.float32)
    return np.concatenate([colours, shape]).astype(np.float32)


def identity_descriptor(frames: np.ndarray, max_frames: int = 16) -> np.ndarray:
    """A small vector of what identifies a toy-world person, from one frame [H,W,3] or a clip [T,H,W,3].

    16 values: background, skin, hair and shirt colours (RGB / 255); face aspect ratio - 1 (x 0.5), face
    width / frame height, long hair beside the face (0 or 0.5) and the hairline height (x 0.5, a fringe
    sits lower). A clip gives the median over up to `max_frames` evenly spaced frames, so blinks and an open
    mouth do not shift it. Resolution independent; NaN when no face is found.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    idx = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    descs = [d for d in (_frame_descriptor(frames[i]) for i in idx) if d is not None]
    if not descs:
        return np.full(16, np.nan, np.float32)
    return np.median(np.stack(descs), axis=0).astype(np.float32)


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two identity descriptors (inf if either has no face)."""
    d = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
    return d if np.isfinite(d) else float("inf")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() < 1e-8 or y.std() < 1e-8:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def lip_sync_score(
    frames: np.ndarray, wave: np.ndarray, fps: float, sample_rate: int = 16000, max_lag: int = 2
) -> LipSync:
    """Correlation between the measured mouth opening and the speech envelope at the best lag in ±max_lag."""
    mouth = mouth_openness(frames).astype(np.float64)
    env = speech_envelope(wave, fps, sample_rate).astype(np.float64)
    n = min(len(mouth), len(env))
    mouth, env = mouth[:n], env[:n]
    per_lag: dict[int, float] = {}
    for lag in range(-max_lag, max_lag + 1):
        # mouth[t] against env[t - lag]
        if lag >= 0:
            per_lag[lag] = _pearson(mouth[lag:], env[: n - lag])
        else:
            per_lag[lag] = _pearson(mouth[:lag], env[-lag:])
    best = max(per_lag, key=lambda k: (per_lag[k], -abs(k)))
    return LipSync(per_lag[best], best, per_lag)


def lip_sync_scores(frames: np.ndarray, audio: np.ndarray, fps: float) -> list[float]:
    """Per clip of a batch (frames [B, T, H, W, 3], speech [B, samples]): its lip-sync score."""
    return [float(lip_sync_score(f, a, fps).score) for f, a in zip(frames, audio, strict=True)]
