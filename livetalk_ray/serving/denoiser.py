"""The Denoiser deployment: one `AvatarStream` per session (KV cache, identity anchors, audio window).

Sessions are sticky: callers route with `handle.options(session_id=...)` and the app's
ConsistentHashRouter, so every call of a session lands on the replica that holds its cache. A call for a
session this replica does not hold (it was lost with another replica, or reaped) raises `SessionLost`,
and the caller re-primes the session from its reference image. Idle sessions are released after
`serve.session_idle_s`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.pipeline import AvatarPipeline, AvatarStream, LatentBlock


class SessionLost(KeyError):
    """The replica does not hold this session (replica replaced, or the session idled out)."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "session lost"


class SessionTable:
    """A replica's sessions, each stamped when last used; the idle ones are reaped."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        self._items: dict[str, list] = {}  # session id → [value, last used]

    def put(self, session_id: str, value) -> None:
        self._items[session_id] = [value, time.monotonic()]

    def get(self, session_id: str):
        item = self._items.get(session_id)
        if item is None:
            raise SessionLost(f"session {session_id} is not held by this {self.holder} replica")
        item[1] = time.monotonic()
        return item[0]

    def close(self, session_id: str) -> bool:
        return self._items.pop(session_id, None) is not None

    def reap(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        idle = [sid for sid, (_, used) in self._items.items() if now - used > idle_s]
        for sid in idle:
            del self._items[sid]
        return idle

    def __len__(self) -> int:
        return len(self._items)


class DenoiserCore:
    """Per-replica session table around one AvatarPipeline; plain Python (the deployment wraps it)."""

    def __init__(self, cfg: LiveTalkConfig, checkpoint: str | Path | None) -> None:
        self.cfg = cfg
        self.pipe = AvatarPipeline(cfg, checkpoint)
        self.sessions = SessionTable("denoiser")

    def open(self, session_id: str, image: np.ndarray, prompt: str, seed: int) -> int:
        """Prime a session's cache from its reference image ([H, W, 3] uint8 at the video size); returns the
        audio samples block 0 wants pushed (its frames plus the feature window's lookahead)."""
        ref = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1
        stream = self.pipe.open_stream(ref.to(self.pipe.device), prompt, seed=seed)
        self.sessions.put(session_id, stream)
        return stream.audio.samples_needed_for_block(0)

    def set_prompt(self, session_id: str, prompt: str) -> None:
        self.sessions.get(session_id).set_prompt(prompt)

    def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        """Push the caller's audio (speech or silence), denoise the next block; returns it and the total
        samples the block after it wants (one call per block: the relay sends exactly the difference)."""
        stream: AvatarStream = self.sessions.get(session_id)
        stream.push_audio(np.asarray(samples, dtype=np.float32))
        block = stream.next_latents()
        block.latents = block.latents.cpu()
        return block, stream.audio.samples_needed_for_block(block.index + 1)

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class Denoiser:
    """Serve deployment class (decorated in serving/app.py). Methods run one at a time per replica on a
    worker thread, so the event loop keeps answering health checks and other sessions' cheap calls."""

    def __init__(self, cfg: dict, checkpoint: str | None) -> None:
        self.cfg = LiveTalkConfig.model_validate(cfg)
        self.core = DenoiserCore(self.cfg, checkpoint)
        self.lock: asyncio.Lock | None = None  # one model, one computation at a time
        self.reaper: asyncio.Task | None = None

    async def _run(self, fn, *args):
        if self.lock is None:  # made on the replica's event loop, which __init__ may not run on
            self.lock = asyncio.Lock()
            self.reaper = asyncio.create_task(reap_forever(self.core.sessions, self.cfg.serve.session_idle_s))
        async with self.lock:
            return await asyncio.to_thread(fn, *args)

    async def open(self, session_id: str, image: np.ndarray, prompt: str, seed: int) -> int:
        return await self._run(self.core.open, session_id, image, prompt, seed)

    async def set_prompt(self, session_id: str, prompt: str) -> None:
        return await self._run(self.core.set_prompt, session_id, prompt)

    async def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        return await self._run(self.core.next_block, session_id, samples)

    async def close(self, session_id: str) -> bool:
        return self.core.close(session_id)

    async def session_count(self) -> int:
        return len(self.core.sessions)


async def reap_forever(sessions: SessionTable, idle_s: float) -> None:
    """Release sessions nobody has touched for `idle_s` (a client that vanished without DELETE)."""
    while True:
        await asyncio.sleep(min(idle_s, 30.0))
        sessions.reap(idle_s)
