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

from livetalk_ray import metrics
from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.models.image import tensor_to_uint8
from livetalk_ray.models.vae import VAEDecodeStream, WanVAE, decode_many
from livetalk_ray.serving.autoscaling import SESSIONS_METRIC
from livetalk_ray.serving.batching import MicroBatcher
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

    def decode_many(self, requests: list[tuple[str, int, torch.Tensor]]) -> list[list[bytes] | Exception]:
        """JPEG frames of one block per (session, block index, latents), all sessions in one batch; block 0
        (re)starts the session's decoder state. Per request: its frames, or its own error."""
        results: list = [None] * len(requests)
        ready: list[tuple[int, VAEDecodeStream, torch.Tensor]] = []
        for i, (session_id, block_index, latents) in enumerate(requests):
            if block_index == 0:
                self.sessions.put(session_id, self.vae.stream())
            try:
                ready.append((i, self.sessions.get(session_id), latents.to(self.vae.device)))
            except Exception as exc:  # noqa: BLE001 - this request's error, not the batch's
                results[i] = exc
        videos = decode_many([d for _, d, _ in ready], [x for _, _, x in ready])
        for (i, _, _), video in zip(ready, videos, strict=True):
            results[i] = [jpeg(f, self.cfg.serve.jpeg_quality) for f in tensor_to_uint8(video[0])]
        return results

    def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        result = self.decode_many([(session_id, block_index, latents)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class VAEDecoder:
    """Serve deployment class (decorated in serving/app.py). Concurrent blocks of different sessions are
    decoded together (serving/batching.py)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = LiveTalkConfig.model_validate(cfg)
        self.core = DecoderCore(self.cfg)
        self.batcher = MicroBatcher(self.core.decode_many, self.cfg.serve.batch_sessions, "VAEDecoder")
        self.reaper: asyncio.Task | None = None

    async def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        if self.reaper is None:  # needs the replica's running event loop
            self.reaper = asyncio.create_task(reap_forever(self.core.sessions, self.cfg.serve.session_idle_s))
        return await self.batcher.submit(session_id, (session_id, block_index, latents))

    async def close(self, session_id: str) -> bool:
        return self.core.close(session_id)

    async def session_count(self) -> int:
        return len(self.core.sessions)

    async def batch_sizes(self) -> list[int]:
        return self.batcher.batch_sizes

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every metrics push; the SessionLoad policy scales on it."""
        return {SESSIONS_METRIC: float(len(self.core.sessions))}

    async def check_health(self) -> None:
        """Serve's periodic health check (every 10 s): also refreshes the sessions gauge, reaps included."""
        metrics.record(metrics.SERVE_SESSIONS, len(self.core.sessions), deployment="VAEDecoder")
