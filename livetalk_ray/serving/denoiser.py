"""The Denoiser deployment: one `AvatarStream` per session (KV cache, identity anchors, audio window).

Sessions are sticky: callers route with `handle.options(session_id=...)` and the app's
ConsistentHashRouter, so every call of a session lands on the replica that holds its cache. A call for a
session this replica does not hold (it was lost with another replica, or reaped) raises `SessionLost`,
and the caller re-primes the session from its reference image. Idle sessions are released after
`serve.session_idle_s`. Blocks of sessions that are ready at the same time are denoised in one batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.pipeline import AvatarPipeline, AvatarStream, LatentBlock, next_latents_many
from livetalk_ray.models.image import decode_reference_image
from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address
from livetalk_ray.serving.sessions import SessionStage, SessionTable


class DenoiserCore:
    """Per-replica session table around one AvatarPipeline; plain Python (the deployment wraps it)."""

    def __init__(self, cfg: LiveTalkConfig, checkpoint: str | Path | None) -> None:
        self.cfg = cfg
        self.pipe = AvatarPipeline(cfg, checkpoint)
        self.sessions = SessionTable("denoiser")

    def open(self, session_id: str, image: bytes, prompt: str, seed: int) -> int:
        """Prime a session's cache from its reference image (encoded bytes, decoded and sized here in float, as
        `livetalk generate` does); returns the audio samples block 0 wants pushed (its frames plus the feature
        window's lookahead)."""
        video = self.cfg.video
        ref = decode_reference_image(image, video.height, video.width, **self.cfg.serve.image_limits)
        stream = self.pipe.open_stream(ref.to(self.pipe.device), prompt, seed=seed)
        self.sessions.put(session_id, stream)
        return stream.audio.samples_needed_for_block(0)

    def set_prompt(self, session_id: str, prompt: str) -> None:
        self.sessions.get(session_id).set_prompt(prompt)

    def next_blocks(self, requests: list[tuple[str, np.ndarray]]) -> list[tuple[LatentBlock, int] | Exception]:
        """For each (session, audio) request: push the caller's audio (speech or silence) and denoise the
        session's next block, all sessions in one batch. Per request: the block and the total samples the
        block after it wants (one call per block: the relay sends exactly the difference), or the error of
        that request alone (e.g. `SessionLost`). The block's `audio` is empty: the relay slices the block's
        sound from what it pushed."""
        results: list = [None] * len(requests)
        ready: list[tuple[int, AvatarStream]] = []
        for i, (session_id, samples) in enumerate(requests):
            try:
                stream: AvatarStream = self.sessions.get(session_id)
                stream.push_audio(np.asarray(samples, dtype=np.float32))
                ready.append((i, stream))
            except Exception as exc:  # noqa: BLE001 - this request's error, not the batch's
                results[i] = exc
        if ready:
            for (i, stream), block in zip(ready, next_latents_many([s for _, s in ready]), strict=True):
                block.latents = block.latents.cpu()
                block.audio = np.zeros(0, np.float32)  # the caller has the samples it pushed: none go back
                results[i] = (block, stream.audio.samples_needed_for_block(block.index + 1))
        return results

    def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        result = self.next_blocks([(session_id, samples)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def export_session(self, session_id: str, forget: bool = False) -> dict:
        """The session's stream state, to be imported on another replica (`AvatarStream.snapshot`). It stays here
        until closed unless `forget` (a drain: a later call must not advance a stream that lives elsewhere now)."""
        snapshot = self.sessions.get(session_id).snapshot()
        if forget:
            self.sessions.close(session_id)
        return snapshot

    def import_session(self, session_id: str, snapshot: dict) -> int:
        """Continue a session exported elsewhere; returns the samples its next block wants pushed in all."""
        stream = self.pipe.restore_stream(snapshot)
        self.sessions.put(session_id, stream)
        return stream.audio.samples_needed_for_block(stream.state.block_index)

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class Denoiser(SessionStage):
    """Serve deployment class (decorated in serving/app.py). Concurrent `next_block` calls of different
    sessions are denoised together (serving/batching.py); priming runs between batches."""

    name = "Denoiser"

    def __init__(self, cfg: dict, checkpoint: str | None, placement=None) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        core = DenoiserCore(config, checkpoint)
        slots = config.serve.admission.slots(config.preset, str(core.pipe.device), config.vae.decoder)[0]
        self._setup(config, core, core.next_blocks, placement, slots)

    async def open(self, session_id: str, image: bytes, prompt: str, seed: int) -> int:
        self._start_reaper()
        return await self.batcher.exclusive(self.core.open, session_id, image, prompt, seed)

    async def set_prompt(self, session_id: str, prompt: str) -> None:
        return await self.batcher.exclusive(self.core.set_prompt, session_id, prompt)

    async def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        self._start_reaper()
        return await self.batcher.submit(session_id, (session_id, samples))

    async def export_session(self, session_id: str, forget: bool = False) -> dict:
        return await self.batcher.exclusive(self.core.export_session, session_id, forget)

    async def import_session(self, session_id: str, snapshot: dict) -> int:
        self._start_reaper()
        return await self.batcher.exclusive(self.core.import_session, session_id, snapshot)
