"""The VAEDecoder deployment: one streaming decoder state per session; latents in, JPEG frames out.

Sticky like the Denoiser (ConsistentHashRouter on the session id). Block 0 of a session (or of a session
re-primed after a lost replica) starts a fresh decoder state, so the two halves never disagree about where
a stream begins.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.models.image import tensor_to_uint8
from livetalk_ray.models.vae import WanVAE
from livetalk_ray.serving.denoiser import SessionLost, reap_forever


def jpeg(frame: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass
class _Session:
    decoder: object  # VAEDecodeStream
    last_used: float


class DecoderCore:
    def __init__(self, cfg: LiveTalkConfig) -> None:
        self.cfg = cfg
        device = resolve_device(cfg.runtime)
        self.vae = WanVAE(cfg.vae, device=device, dtype=resolve_dtype(cfg.runtime, device), seed=TOY_INIT_SEED)
        self.sessions: dict[str, _Session] = {}

    def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        """Frames of one block as JPEG bytes; block 0 (re)starts the session's decoder state."""
        if block_index == 0:
            self.sessions[session_id] = _Session(self.vae.stream(), time.monotonic())
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionLost(f"session {session_id} is not held by this decoder replica")
        session.last_used = time.monotonic()
        frames = tensor_to_uint8(session.decoder.decode_block(latents.to(self.vae.device))[0])
        return [jpeg(f, self.cfg.serve.jpeg_quality) for f in frames]

    def close(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def reap(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        idle = [sid for sid, s in self.sessions.items() if now - s.last_used > idle_s]
        for sid in idle:
            del self.sessions[sid]
        return idle


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
            self.reaper = asyncio.create_task(reap_forever(self.core, self.cfg.serve.session_idle_s))
        async with self.lock:
            return await asyncio.to_thread(self.core.decode, session_id, block_index, latents)

    async def close(self, session_id: str) -> bool:
        return self.core.close(session_id)

    async def session_count(self) -> int:
        return len(self.core.sessions)
