"""The VAEDecoder deployment: one streaming decoder state per session; latents in, JPEG frames out.

Sticky like the Denoiser (ConsistentHashRouter on the session id). Block 0 of a session (or of a session
re-primed after a lost replica) starts a fresh decoder state, so the two halves never disagree about where
a stream begins.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import torch
from PIL import Image

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.models.image import tensor_to_uint8
from livetalk_ray.models.vae import WanVAE
from livetalk_ray.serving.denoiser import SessionTable, reap_forever


def jpeg(frame: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


class DecoderCore:
    def __init__(self, cfg: LiveTalkConfig) -> None:
        self.cfg = cfg
        device = resolve_device(cfg.runtime)
        self.vae = WanVAE(cfg.vae, device=device, dtype=resolve_dtype(cfg.runtime, device), seed=TOY_INIT_SEED)
        self.sessions = SessionTable("decoder")

    def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        """Frames of one block as JPEG bytes; block 0 (re)starts the session's decoder state."""
        if block_index == 0:
            self.sessions.put(session_id, self.vae.stream())
        decoder = self.sessions.get(session_id)
        frames = tensor_to_uint8(decoder.decode_block(latents.to(self.vae.device))[0])
        return [jpeg(f, self.cfg.serve.jpeg_quality) for f in frames]

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class VAEDecoder:
    """Serve deployment class (decorated in serving/app.py)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = LiveTalkConfig.model_validate(cfg)
        self.core = DecoderCore(self.cfg)
        self.lock: asyncio.Lock | None = None
        self.reaper: asyncio.Task | None = None

    async def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        if self.lock is None:
            self.lock = asyncio.Lock()
            self.reaper = asyncio.create_task(reap_forever(self.core.sessions, self.cfg.serve.session_idle_s))
        async with self.lock:
            return await asyncio.to_thread(self.core.decode, session_id, block_index, latents)

    async def close(self, session_id: str) -> bool:
        return self.core.close(session_id)

    async def session_count(self) -> int:
        return len(self.core.sessions)
