"""Stylised frontal talking heads drawn with numpy: seeded identities, smooth head motion, blinks, a moving mouth.

Shapes are implicit functions evaluated on a supersampled pixel grid in head-local coordinates (so head
translation, scale and tilt are one inverse transform), then box-filtered down for anti-aliased edges.
All lengths are in units of the frame height, so any resolution renders the same picture.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RGB = tuple[int, int, int]

# Named palettes, so captions can say what is drawn. Sampling below rejects colours too close to the skin
# (or to the background) so the face and its outline stay separable, for the model and for measure.py.
SKIN_TONES: dict[str, RGB] = {
    "pale": (246, 222, 204),
    "fair": (236, 200, 170),
    "light": (222, 178, 140),
    "olive": (196, 152, 108),
    "tan": (176, 124, 86),
    "brown": (140, 94, 64),
    "dark": (104, 68, 48),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (28, 24, 24),
    "dark brown": (66, 42, 30),
    "brown": (112, 72, 44),
    "red": (176, 62, 30),
    "blonde": (228, 198, 116),
    "grey": (150, 150, 156),
    "white": (238, 238, 232),
    "blue": (52, 92, 200),
    "pink": (226, 104, 170),
}
EYE_COLOURS: dict[str, RGB] = {
    "brown": (104, 62, 30),
    "dark": (50, 34, 24),
    "blue": (60, 120, 205),
    "green": (60, 140, 80),
    "grey": (120, 132, 142),
    "hazel": (146, 112, 50),
}
BACKGROUNDS: dict[str, RGB] = {
    "blue": (70, 110, 190),
    "light blue": (150, 188, 228),
    "green": (80, 150, 90),
    "teal": (44, 136, 140),
    "purple": (120, 80, 160),
    "lavender": (186, 166, 222),
    "grey": (128, 128, 132),
    "light grey": (204, 204, 208),
    "navy": (30, 40, 92),
    "mint": (168, 222, 190),
}
SHIRT_COLOURS: dict[str, RGB] = {
    "red": (190, 40, 40),
    "blue": (40, 70, 170),
    "green": (40, 130, 70),
    "black": (30, 30, 34),
    "white": (236, 236, 236),
    "grey": (110, 110, 116),
    "yellow": (226, 192, 50),
    "purple": (110, 50, 140),
    "orange": (232, 122, 30),
}
HAIR_STYLES = ("short", "bangs", "curly", "long")

FACE_CENTRE_Y = 0.48  # face centre, in frame heights from the top
MOUTH_CLOSED_H = 0.07  # interior mouth height (fraction of face half-width rx) when closed: a thin line
MOUTH_OPEN_H = 0.62  # ... and fully open: ~9 px at 64x64, large enough for a tiny model to learn
MOUTH_Y = 0.52  # mouth centre below the face centre, fraction of ry
EYE_Y = -0.18  # eye centres, fraction of ry (negative = up)
NECK_SHADE = 0.66  # the neck is shadowed skin: measure.py must not mistake it for the face
MOUTH_INTERIOR: RGB = (40, 8, 14)


@dataclass(frozen=True)
class Identity:
    """Everything that makes one person look like themselves; drawn from a seed by `sample_identity`."""

    seed: int
    face_rx: float  # face half-width, in frame heights
    face_aspect: float  # ry / rx
    skin: str
    skin_rgb: RGB
    hair: str
    hair_rgb: RGB
    hair_style: str
    eyes: str
    eye_rgb: RGB
    eye_size: float  # eye half-height, fraction of rx
    eye_spacing: float  # eye centre offset from the midline, fraction of rx
    mouth_width: float  # mouth half-width, fraction of rx
    background: str
    background_rgb: RGB
    background_gradient: float  # 0 = plain; otherwise top-to-bottom brightness change
    shirt: str
    shirt_rgb: RGB

    @property
    def lip_rgb(self) -> RGB:
        r, g, b = self.skin_rgb
        return (min(255, int(r * 0.86) + 20), int(g * 0.58), int(b * 0.58) + 8)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Identity:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


@dataclass(frozen=True)
class HeadMotion:
    """Per-frame head pose and blinks. dx/dy in frame heights, scale relative, tilt in degrees."""

    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    tilt: np.ndarray
    eyes_open: np.ndarray  # bool
    energy: float  # 0..1, how lively the head moves (drives the caption's adverb)

    def __len__(self) -> int:
        return len(self.dx)

    @classmethod
    def still(cls, num_frames: int) -> HeadMotion:
        zeros = np.zeros(num_frames, np.float32)
        return cls(zeros, zeros, zeros + 1.0, zeros, np.ones(num_frames, bool), 0.0)


def _rgb_dist(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float32)))


def _pick(rng: np.random.Generator, palette: dict[str, RGB], avoid: list[tuple[RGB, float]]) -> tuple[str, RGB]:
    """A named colour at least `min_dist` from every colour to avoid, jittered so identities are not discrete."""
    names = [n for n, c in palette.items() if all(_rgb_dist(c, a) >= d for a, d in avoid)]
    name = names[int(rng.integers(len(names)))]
    r, g, b = (int(v) for v in np.clip(np.add(palette[name], rng.integers(-6, 7, size=3)), 0, 255))
    return name, (r, g, b)


# Identities no training set contains: the page's bundled portraits and `livetalk eval`'s held-out people.
PORTRAIT_SEEDS = {"ada": 11, "bo": 23, "cy": 37, "dee": 41, "eli": 53, "fay": 67}


def sample_identity(seed: int) -> Identity:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))  # stream 1: identity, apart from motion/speech
    skin, skin_rgb = _pick(rng, SKIN_TONES, [])
    hair, hair_rgb = _pick(rng, HAIR_COLOURS, [(skin_rgb, 75.0)])
    background, bg_rgb = _pick(rng, BACKGROUNDS, [(skin_rgb, 85.0), (hair_rgb, 60.0)])
    shirt, shirt_rgb = _pick(rng, SHIRT_COLOURS, [(skin_rgb, 75.0), (bg_rgb, 60.0)])
    eyes, eye_rgb = _pick(rng, EYE_COLOURS, [])
    return Identity(
        seed=seed,
        face_rx=float(rng.uniform(0.20, 0.245)),
        face_aspect=float(rng.uniform(1.12, 1.38)),
        skin=skin,
        skin_rgb=skin_rgb,
        hair=hair,
        hair_rgb=hair_rgb,
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        eyes=eyes,
        eye_rgb=eye_rgb,
        eye_size=float(rng.uniform(0.11, 0.15)),
        eye_spacing=float(rng.uniform(0.34, 0.44)),
        mouth_width=float(rng.uniform(0.36, 0.48)),
        background=background,
        background_rgb=bg_rgb,
        background_gradient=0.0 if rng.random() < 0.5 else float(rng.uniform(0.3, 0.6)),
        shirt=shirt,
        shirt_rgb=shirt_rgb,
    )


def _smooth_noise(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Sum of three slow sinusoids with random frequency and phase, scaled to peak ~1: smooth, no drift."""
    out = np.zeros_like(t)
    for _ in range(3):
        out += rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * rng.uniform(0.15, 0.7) * t + rng.uniform(0, 2 * np.pi))
    return out / 2.0


def blink_schedule(rng: np.random.Generator, num_frames: int, fps: float) -> np.ndarray:
    """Eyes-open flags: closed for 2-3 frames (at 16 fps) every 1.5-4 s."""
    eyes_open = np.ones(num_frames, bool)
    t = rng.uniform(0.3, 2.5)
    while (start := int(round(t * fps))) < num_frames:
        length = max(1, int(round(rng.choice([0.125, 0.1875]) * fps)))
        eyes_open[start : start + length] = False
        t += rng.uniform(1.5, 4.0)
    return eyes_open


def sample_motion(seed: int, num_frames: int, fps: float, energy: float | None = None) -> HeadMotion:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))  # stream 2: motion
    energy = float(rng.uniform(0.2, 1.0)) if energy is None else float(energy)
    t = np.arange(num_frames, dtype=np.float64) / fps
    dx = energy * 0.035 * _smooth_noise(rng, t)
    dy = energy * 0.025 * _smooth_noise(rng, t)
    scale = 1.0 + energy * 0.03 * _smooth_noise(rng, t)
    tilt = energy * 5.0 * _smooth_noise(rng, t)
    eyes_open = blink_schedule(rng, num_frames, fps)
    f32 = np.float32
    return HeadMotion(dx.astype(f32), dy.astype(f32), scale.astype(f32), tilt.astype(f32), eyes_open, energy)


class _Canvas:
    """A supersampled frame plus its pixel-centre coordinates (in frame heights)."""

    def __init__(self, height: int, width: int, supersample: int) -> None:
        self.height, self.width, self.ss = height, width, supersample
        hs, ws = height * supersample, width * supersample
        self.y = ((np.arange(hs, dtype=np.float32) + 0.5) / hs)[:, None]
        self.x = ((np.arange(ws, dtype=np.float32) + 0.5) / hs)[None, :]
        self.img = np.zeros((hs, ws, 3), np.float32)

    def paint(self, mask: np.ndarray, rgb: RGB | np.ndarray) -> None:
        self.img[mask] = rgb

    def result(self) -> np.ndarray:
        s = self.ss
        small = self.img.reshape(self.height, s, self.width, s, 3).mean(axis=(1, 3))
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 < 1.0


def _shade(rgb: RGB, factor: float) -> RGB:
    return (int(rgb[0] * factor), int(rgb[1] * factor), int(rgb[2] * factor))


def _hair_masks(ident: Identity, u: np.ndarray, v: np.ndarray, rx: float, ry: float) -> tuple[np.ndarray, np.ndarray]:
    """(behind-the-face hair, hair over the forehead) for the identity's style."""
    style = ident.hair_style
    un = u / rx
    inside_face = _ellipse(u, v, 0, 0, rx, ry)
    if style == "curly":  # bumpy outline: radius modulated around the head
        ang = np.arctan2(v + 0.05 * ry, u)
        bump = 1.0 + 0.07 * np.sin(10 * ang)
        cap = _ellipse(u / bump, (v + 0.05 * ry) / bump, 0, 0, 1.2 * rx, 1.14 * ry)
    else:
        cap = _ellipse(u, v, 0, -0.05 * ry, 1.1 * rx, 1.08 * ry)
    hairline = {
        "short": -0.55 * ry + 0.35 * ry * un**2,
        "bangs": -0.40 * ry + 0.08 * ry * un**2 + 0.03 * ry * np.sin(11 * un),  # wavy fringe
        "curly": -0.52 * ry + 0.30 * ry * un**2,
        "long": -0.55 * ry + 0.30 * ry * un**2,
    }[style]
    side = {"short": -0.05, "bangs": 0.0, "curly": 0.1, "long": 0.1}[style] * ry
    front = cap & ((v < hairline) | (~inside_face & (v < side)))
    if style == "long":  # hair falling to the shoulders, drawn behind the face and neck
        back = _ellipse(u, v, 0, -0.02 * ry, 1.22 * rx, 1.08 * ry)
        back |= (np.abs(u) < 1.18 * rx) & (v > 0) & (v < 1.2 * ry - 0.2 * ry * un**2)
    else:
        back = np.zeros_like(front)
    return back, front


def render_frame(
    ident: Identity,
    *,
    height: int = 64,
    width: int = 64,
    mouth: float = 0.0,
    eyes_open: bool = True,
    dx: float = 0.0,
    dy: float = 0.0,
    scale: float = 1.0,
    tilt: float = 0.0,
    supersample: int = 4,
) -> np.ndarray:
    """One RGB frame [H, W, 3] uint8. `mouth` in [0, 1]: 0 = closed thin line, 1 = wide open."""
    cv = _Canvas(height, width, supersample)
    x, y = cv.x, cv.y
    cx0, cy0 = 0.5 * width / height, FACE_CENTRE_Y
    # Background: plain or a vertical gradient (lighter at the top, at most +-18 % so it keeps its name).
    ramp = 1.0 + 0.6 * ident.background_gradient * (0.5 - y)  # [hs, 1]
    cv.img[:] = np.clip(np.asarray(ident.background_rgb, np.float32) * ramp[..., None], 0, 255)

    # Head-local coordinates: undo translation, tilt and scale about the face centre.
    a = math.radians(tilt)
    px, py = x - (cx0 + dx), y - (cy0 + dy)
    u = (math.cos(a) * px + math.sin(a) * py) / scale
    v = (-math.sin(a) * px + math.cos(a) * py) / scale
    rx = ident.face_rx
    ry = rx * ident.face_aspect
    back_hair, front_hair = _hair_masks(ident, u, v, rx, ry)

    cv.paint(back_hair, ident.hair_rgb)
    cv.paint((np.abs(u) < 0.42 * rx) & (v > 0.3 * ry), _shade(ident.skin_rgb, NECK_SHADE))
    # Shoulders belong to the body: they follow the head's translation only a little.
    shoulders = _ellipse(x, y, cx0 + 0.3 * dx, 1.13 + 0.3 * dy, 0.44 * width / height, 0.27)
    cv.paint(shoulders, ident.shirt_rgb)
    cv.paint(_ellipse(u, v, 0, 0, rx, ry), ident.skin_rgb)

    # Nose: a faint shadow, deliberately much lighter than the mouth.
    cv.paint(_ellipse(u, v, 0, 0.2 * ry, 0.1 * rx, 0.15 * ry), _shade(ident.skin_rgb, 0.9))

    er = ident.eye_size * rx
    ey = EYE_Y * ry
    for side in (-1.0, 1.0):
        ex = side * ident.eye_spacing * rx
        brow = _ellipse(u, v, ex, ey - 2.3 * er, 1.7 * er, 0.38 * er)
        cv.paint(brow, _shade(ident.hair_rgb, 0.85))
        if eyes_open:
            sclera = _ellipse(u, v, ex, ey, 1.35 * er, er)
            cv.paint(sclera, (245, 245, 240))
            cv.paint(sclera & _ellipse(u, v, ex, ey, 0.8 * er, 0.8 * er), ident.eye_rgb)
            cv.paint(sclera & _ellipse(u, v, ex, ey, 0.38 * er, 0.38 * er), (14, 14, 18))
        else:  # closed lid: a downward-curved lash line
            du = (u - ex) / (1.35 * er)
            lid = (np.abs(du) < 1.0) & (np.abs(v - ey - 0.3 * er * (1 - du**2)) < 0.22 * er)
            cv.paint(lid, (44, 32, 32))

    # Mouth: lips around a dark interior whose height follows `mouth`; a little narrower when open.
    o = float(np.clip(mouth, 0.0, 1.0))
    mw = ident.mouth_width * rx * (1.0 - 0.12 * o)
    mh = 0.5 * rx * (MOUTH_CLOSED_H + o * (MOUTH_OPEN_H - MOUTH_CLOSED_H))
    my = MOUTH_Y * ry
    cv.paint(_ellipse(u, v, 0, my, mw + 0.06 * rx, mh + 0.07 * rx), ident.lip_rgb)
    cv.paint(_ellipse(u, v, 0, my, mw, mh), MOUTH_INTERIOR)

    cv.paint(front_hair, ident.hair_rgb)
    return cv.result()


def render_frames(
    ident: Identity,
    mouth: np.ndarray,
    motion: HeadMotion | None = None,
    *,
    height: int = 64,
    width: int = 64,
    supersample: int = 4,
) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 for per-frame mouth openness `mouth` [T]; no motion = a still head."""
    motion = HeadMotion.still(len(mouth)) if motion is None else motion
    if len(motion) != len(mouth):
        raise ValueError(f"motion has {len(motion)} frames but mouth has {len(mouth)}")
    out = np.empty((len(mouth), height, width, 3), np.uint8)
    for i in range(len(mouth)):
        out[i] = render_frame(
            ident,
            height=height,
            width=width,
            mouth=float(mouth[i]),
            eyes_open=bool(motion.eyes_open[i]),
            dx=float(motion.dx[i]),
            dy=float(motion.dy[i]),
            scale=float(motion.scale[i]),
            tilt=float(motion.tilt[i]),
            supersample=supersample,
        )
    return out


def render_reference(ident: Identity, height: int = 128, width: int = 128) -> np.ndarray:
    """The clean reference portrait: neutral closed mouth, eyes open, head centred and upright."""
    return render_frame(ident, height=height, width=width, mouth=0.0)


def face_centre_px(motion: HeadMotion, height: int, width: int) -> np.ndarray:
    """Ground-truth face centre per frame in pixel coordinates [T, 2] (x, y)."""
    x = (0.5 * width / height + motion.dx) * height
    y = (FACE_CENTRE_Y + motion.dy) * height
    return np.stack([x, y], axis=1).astype(np.float32)
