"""Bundled portraits for the page's picker: toy-world identities that no training set contains (`livetalk
eval` streams them as its held-out people), and the page's note on what the served model animates."""

from __future__ import annotations

import io
from functools import cache

from livetalk_ray.toyworld.render import PORTRAIT_SEEDS

TOY_NOTE = (
    "The embedded toy model knows only toy-world portraits (64x64 drawn heads like these, none of them seen in"
    " training) and draws any uploaded photo as such a head. For real faces, serve a real checkpoint:"
    " livetalk serve --preset wan-1.3b --checkpoint DIR."
)


def model_note(cfg) -> str:
    """One plain sentence for the page: what the served model animates."""
    if cfg.preset == "toy":
        return TOY_NOTE
    return f"LiveTalk {cfg.preset} at {cfg.video.width}x{cfg.video.height}: animates the uploaded photo's face."


def portraits() -> tuple[str, ...]:
    return tuple(PORTRAIT_SEEDS)


@cache
def portrait_png(name: str) -> bytes:
    from PIL import Image

    from livetalk_ray.toyworld.render import render_reference, sample_identity

    out = io.BytesIO()
    Image.fromarray(render_reference(sample_identity(PORTRAIT_SEEDS[name]), 256, 256)).save(out, format="PNG")
    return out.getvalue()
