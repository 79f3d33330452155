"""Fréchet distance: exact on Gaussians with known moments, zero on identical sets, grows with shift."""

import numpy as np

from livetalk_ray.eval.frechet import frame_features, frechet_distance


def test_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(1, 2, (20000, 3))
    # ‖μa − μb‖² + Σ (σa − σb)² per dimension = 3·1 + 3·1
    assert abs(frechet_distance(a, b) - 6.0) < 0.15
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frame_features_are_block_means():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[1, :8, :8] = 255
    f = frame_features(frames, size=2)
    assert f.shape == (2, 12) and f[0].max() == 0 and f[1][:3].tolist() == [1.0, 1.0, 1.0]
    shifted = frame_features(np.clip(frames.astype(int) + 40, 0, 255).astype(np.uint8), size=2)
    assert frechet_distance(np.repeat(f, 5, 0) + 1e-3 * np.arange(10)[:, None], shifted.repeat(5, 0)) > 0
