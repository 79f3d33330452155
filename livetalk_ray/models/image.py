"""Reference-image loading: any size or format PIL reads → [3, H, W] in [-1, 1] at the preset resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from livetalk_ray.media import ImageError, read_image


def resize_cover_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., C, H, W] float → scaled to cover (height, width), centre-cropped (LiveTalk's resize_pad, whose
    negative padding crops). Reference images and video frames go through this one function."""
    scale = max(height / images.shape[-2], width / images.shape[-1])
    size = (max(height, round(images.shape[-2] * scale)), max(width, round(images.shape[-1] * scale)))
    batch = images.reshape(-1, *images.shape[-3:])
    out = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return out[..., top : top + height, left : left + width].reshape(*images.shape[:-2], height, width)


def load_reference_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"reference image not found: {path}")
    return decode_reference_image(path.read_bytes(), height, width, name=str(path))


def decode_reference_image(data: bytes, height: int, width: int, name: str = "the upload", **limits) -> torch.Tensor:
    """Encoded image bytes → [3, H, W] in [-1, 1], scaled to cover and centre-cropped; first the checks of
    `media.read_image` (`limits`: its max_pixels, max_side, max_aspect)."""
    image = read_image(data, name, **limits)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return (resize_cover_crop(pixels, height, width) / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


def tensor_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Video [3, T, H, W] in [-1, 1] → [T, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two stacks of uint8 frames (over every pixel of all of them)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def frame_grid(frames: np.ndarray, refs: np.ndarray, every: int = 2) -> np.ndarray:
    """[B, T, H, W, 3] + references [B, H, W, 3] → one image: a row per clip, reference first."""
    rows = []
    for clip, ref in zip(frames, refs, strict=True):
        tiles = [ref, np.full_like(ref[:, :4], 255), *clip[::every]]
        rows.append(np.concatenate(tiles, axis=1))
    pad = np.full_like(rows[0][:4], 255)
    return np.concatenate([r for row in rows for r in (row, pad)][:-1], axis=0)
