"""The VAEDecoder deployment: one streaming decoder state per session; latents in, JPEG frames out.

Sticky like the Denoiser (ConsistentHashRouter on the session id). Block 0 of a session (or of a session
re-primed after a lost replica) starts a fresh decoder state, so the two halves never disagree about where
a stream begins.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.models.image import tensor_to_uint8
from livetalk_ray.models.vae import decode_many, frame_decoder
from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address
from livetalk_ray.serving.sessions import SessionStage, SessionTable


def jpeg(frame: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


class DecoderCore:
    def __init__(self, cfg: LiveTalkConfig) -> None:
        self.cfg = cfg
        device = resolve_device(cfg.runtime)
        dtype = resolve_dtype(cfg.runtime, device)
        self.vae = frame_decoder(cfg.vae, device=device, dtype=dtype, seed=TOY_INIT_SEED)  # full or tiny
        self.sessions = SessionTable("decoder")

    def decode_many(self, requests: list[tuple[str, int, torch.Tensor]]) -> list[list[bytes] | Exception]:
        """JPEG frames of one block per (session, block index, latents), all sessions in one batch; block 0
        (re)starts the session's decoder state. Per request: its frames, or its own error."""
        results: list = [None] * len(requests)
        ready: list[tuple[int, object, torch.Tensor]] = []  # a VAEDecodeStream or a TinyDecodeStream
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

    def export_session(self, session_id: str, forget: bool = False) -> dict:
        """The session's decoder state for another replica; it stays here until closed unless `forget` (a drain)."""
        snapshot = self.sessions.get(session_id).snapshot()
        if forget:
            self.sessions.close(session_id)
        return snapshot

    def import_session(self, session_id: str, snapshot: dict) -> None:
        self.sessions.put(session_id, self.vae.stream().restore(snapshot))

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class VAEDecoder(SessionStage):
    """Serve deployment class (decorated in serving/app.py). Concurrent blocks of different sessions are
    decoded together (serving/batching.py)."""

    name = "VAEDecoder"

    def __init__(self, cfg: dict, placement=None) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        core = DecoderCore(config)
        slots = config.serve.admission.slots(config.preset, str(core.vae.device), config.vae.decoder)[1]
        self._setup(config, core, core.decode_many, placement, slots)

    async def decode(self, session_id: str, block_index: int, latents: torch.Tensor) -> list[bytes]:
        self._start_reaper()
        return await self.batcher.submit(session_id, (session_id, block_index, latents))

    async def export_session(self, session_id: str, forget: bool = False) -> dict:
        return await self.batcher.exclusive(self.core.export_session, session_id, forget)

    async def import_session(self, session_id: str, snapshot: dict) -> None:
        self._start_reaper()
        await self.batcher.exclusive(self.core.import_session, session_id, snapshot)
