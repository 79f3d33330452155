"""Fréchet distance between two sets of frame features (the FID formula on a feature extractor this
machine can run without downloaded weights).

Features of a frame: its 8x8 RGB thumbnail in [0, 1] (192 values). On the toy world, where every
picture is a face on a plain background, that captures what matters at this size: colours, layout,
sharpness of the mouth and eyes averaged over blocks. It is not Inception-FID and its values are only
comparable with each other.
"""

from __future__ import annotations

import numpy as np


def frame_features(frames: np.ndarray, size: int = 8) -> np.ndarray:
    """[N, H, W, 3] uint8 → [N, size·size·3] block means in [0, 1]."""
    frames = np.asarray(frames, np.float32) / 255.0
    n, h, w, c = frames.shape
    if h % size or w % size:
        raise ValueError(f"frames of {h}x{w} do not split into {size}x{size} blocks")
    blocks = frames.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
    return blocks.reshape(n, -1)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) for feature sets [N, D] and [M, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two feature vectors on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))
