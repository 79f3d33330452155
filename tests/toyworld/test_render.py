from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from livetalk_ray.toyworld.render import (
    FACE_CENTRE_Y,
    HAIR_STYLES,
    MOUTH_INTERIOR,
    HeadMotion,
    _rgb_dist,
    blink_schedule,
    render_frame,
    render_frames,
    render_reference,
    sample_identity,
    sample_motion,
)


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def test_identity_is_deterministic_and_varied() -> None:
    assert sample_identity(3) == sample_identity(3)
    idents = [sample_identity(s) for s in range(60)]
    assert len({i.skin for i in idents}) >= 5
    assert len({i.hair for i in idents}) >= 6
    assert len({i.background for i in idents}) >= 6
    assert {i.hair_style for i in idents} == set(HAIR_STYLES)
    assert any(i.background_gradient > 0 for i in idents) and any(i.background_gradient == 0 for i in idents)
    assert len({i.face_aspect for i in idents}) == 60


def test_palette_keeps_face_separable() -> None:
    # Colours within jitter of the sampling thresholds: the face never blends into hair, background or shirt.
    for seed in range(300):
        i = sample_identity(seed)
        assert _rgb_dist(i.skin_rgb, i.hair_rgb) > 60
        assert _rgb_dist(i.skin_rgb, i.background_rgb) > 70
        assert _rgb_dist(i.skin_rgb, i.shirt_rgb) > 60


def test_identity_round_trips_through_dict() -> None:
    ident = sample_identity(9)
    assert type(ident).from_dict(ident.to_dict()) == ident


def test_frame_shape_determinism_and_resolution() -> None:
    ident = sample_identity(1)
    a = render_frame(ident, mouth=0.4, dx=0.01, tilt=3.0)
    b = render_frame(ident, mouth=0.4, dx=0.01, tilt=3.0)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert render_frame(ident, height=48, width=80).shape == (48, 80, 3)


def test_edges_are_antialiased() -> None:
    frame = render_frame(sample_identity(2), mouth=0.5)
    # Supersampling blends colours along every outline: far more distinct colours than drawn shapes.
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 60


def test_mouth_height_follows_openness() -> None:
    heights = {}
    for seed in range(6):
        ident = sample_identity(seed)
        for o in (0.0, 0.5, 1.0):
            frame = render_frame(ident, mouth=o)
            ry = ident.face_rx * ident.face_aspect * 64
            top, bottom = round((FACE_CENTRE_Y * 64) + 0.2 * ry), round((FACE_CENTRE_Y * 64) + 0.9 * ry)
            lower = _luma(frame)[top:bottom, 28:36]  # centre columns, around the mouth
            interior = _luma(np.array([[MOUTH_INTERIOR]], np.uint8))[0, 0]
            halfway = (_luma(frame)[30, 32] + interior) / 2  # between skin (cheek) and mouth interior
            heights[seed, o] = (lower < halfway).sum(axis=0).max()
        assert heights[seed, 0.0] <= 2  # a thin line
        assert heights[seed, 0.0] < heights[seed, 0.5] < heights[seed, 1.0]
        assert heights[seed, 1.0] >= 8  # large enough for a 64x64 model to see


def test_blinks_close_the_eyes_only() -> None:
    ident = sample_identity(4)
    open_, shut = render_frame(ident), render_frame(ident, eyes_open=False)
    changed = np.abs(open_.astype(int) - shut.astype(int)).sum(-1) > 0
    rows = np.nonzero(changed.any(axis=1))[0]
    assert len(rows) > 0 and rows.max() < 32  # the upper face changes, the mouth does not


def test_blink_schedule() -> None:
    eyes = blink_schedule(np.random.default_rng(0), 16 * 30, 16)
    closed = np.flatnonzero(~eyes)
    runs = np.split(closed, np.flatnonzero(np.diff(closed) > 1) + 1)
    assert len(runs) >= 6
    assert all(2 <= len(r) <= 3 for r in runs)
    starts = np.array([r[0] for r in runs])
    assert np.diff(starts).min() >= int(1.5 * 16) - 1


def test_motion_is_small_smooth_and_seeded() -> None:
    m = sample_motion(5, 64, 16)
    assert len(m) == 64
    assert np.array_equal(m.dx, sample_motion(5, 64, 16).dx)
    assert not np.array_equal(m.dx, sample_motion(6, 64, 16).dx)
    assert np.abs(m.dx).max() * 64 < 3.5 and np.abs(m.tilt).max() <= 5.0
    assert np.abs(m.scale - 1).max() <= 0.03 + 1e-6
    assert np.abs(np.diff(m.dx)).max() * 64 < 1.0  # under a pixel per frame


def test_render_frames_matches_render_frame() -> None:
    ident = sample_identity(7)
    motion = sample_motion(7, 6, 16)
    mouth = np.linspace(0, 1, 6, dtype=np.float32)
    frames = render_frames(ident, mouth, motion)
    assert frames.shape == (6, 64, 64, 3)
    i = 3
    one = render_frame(
        ident,
        mouth=float(mouth[i]),
        eyes_open=bool(motion.eyes_open[i]),
        dx=float(motion.dx[i]),
        dy=float(motion.dy[i]),
        scale=float(motion.scale[i]),
        tilt=float(motion.tilt[i]),
    )
    assert np.array_equal(frames[i], one)
    with pytest.raises(ValueError, match="frames"):
        render_frames(ident, mouth, HeadMotion.still(5))


def test_reference_is_a_neutral_still_at_any_size() -> None:
    ident = sample_identity(8)
    ref = render_reference(ident, 128, 128)
    assert ref.shape == (128, 128, 3)
    small = np.asarray(Image.fromarray(ref).resize((64, 64), Image.Resampling.BOX))
    diff = np.abs(small.astype(int) - render_frame(ident, mouth=0.0).astype(int))
    assert diff.mean() < 2.0
