"""Reference-image loading: any size or format PIL reads → [3, H, W] in [-1, 1] at the preset resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def resize_cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover the target, then centre-crop (LiveTalk's resize_pad with its negative padding)."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_reference_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"reference image not found: {path}")
    try:
        with Image.open(path) as raw:
            image = ImageOps.exif_transpose(raw).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"cannot read {path} as an image: {exc}") from None
    if min(image.size) < 8:
        raise ImageError(f"reference image {path} is too small ({image.width}x{image.height})")
    return pil_to_tensor(resize_cover_crop(image, height, width))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Video [3, T, H, W] in [-1, 1] → [T, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
