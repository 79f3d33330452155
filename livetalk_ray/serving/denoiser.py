"""The Denoiser deployment: one `AvatarStream` per session (KV cache, identity anchors, audio window).

Sessions are sticky: callers route with `handle.options(session_id=...)` and the app's
ConsistentHashRouter, so every call of a session lands on the replica that holds its cache. A call for a
session this replica does not hold (it was lost with another replica, or reaped) raises `SessionLost`,
and the caller re-primes the session from its reference image. Idle sessions are released after
`serve.session_idle_s`. Blocks of sessions that are ready at the same time are denoised in one batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from pathlib import Path

import numpy as np
import torch

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.pipeline import AvatarPipeline, AvatarStream, LatentBlock, next_latents_many
from livetalk_ray.serving.autoscaling import SESSIONS_METRIC
from livetalk_ray.serving.batching import MicroBatcher
from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address


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

    def next_blocks(self, requests: list[tuple[str, np.ndarray]]) -> list[tuple[LatentBlock, int] | Exception]:
        """For each (session, audio) request: push the caller's audio (speech or silence) and denoise the
        session's next block, all sessions in one batch. Per request: the block and the total samples the
        block after it wants (one call per block: the relay sends exactly the difference), or the error of
        that request alone (e.g. `SessionLost`)."""
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
                results[i] = (block, stream.audio.samples_needed_for_block(block.index + 1))
        return results

    def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        result = self.next_blocks([(session_id, samples)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def close(self, session_id: str) -> bool:
        return self.sessions.close(session_id)


class SessionStage:
    """What the stateful stage deployments (Denoiser, VAEDecoder) share: sessions on `core.sessions`, a
    batcher over the core's batch function, idle reaping, and the numbers Serve and Prometheus read."""

    name = ""  # the deployment's name, for metrics

    def _setup(self, cfg: LiveTalkConfig, core, run_batch) -> None:
        self.cfg, self.core = cfg, core
        self.batcher = MicroBatcher(run_batch, cfg.serve.batch_sessions, self.name)
        self.reaper: asyncio.Task | None = None
        self._trim_pending = False  # a release of freed memory is scheduled

    def _start_reaper(self) -> None:  # needs the replica's running event loop, which __init__ may not have
        if self.reaper is None:
            idle_s = self.cfg.serve.session_idle_s
            self.reaper = asyncio.create_task(reap_forever(self.core.sessions, idle_s, self._memory_back))

    async def close(self, session_id: str) -> bool:
        closed = self.core.close(session_id)
        self._memory_back()
        return closed

    def _memory_back(self) -> None:
        """Give the memory of ended sessions back to the system, once per burst of releases (a second after the
        first): freed tensors stay in the allocator's arenas otherwise, and the replica keeps its peak size."""
        if self._trim_pending:
            return
        self._trim_pending = True

        def trim() -> None:
            self._trim_pending = False
            release_free_memory()

        asyncio.get_running_loop().call_later(1.0, trim)

    async def session_count(self) -> int:
        return len(self.core.sessions)

    async def replica_name(self) -> str:
        return replica_actor_name()

    async def batch_sizes(self) -> list[int]:
        return self.batcher.batch_sizes

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every metrics push; the SessionLoad policy scales on it."""
        return {SESSIONS_METRIC: float(len(self.core.sessions))}

    async def check_health(self) -> None:
        """Serve's periodic health check (every 10 s): also refreshes the sessions gauge, reaps included."""
        metrics.record(metrics.SERVE_SESSIONS, len(self.core.sessions), deployment=self.name)


class Denoiser(SessionStage):
    """Serve deployment class (decorated in serving/app.py). Concurrent `next_block` calls of different
    sessions are denoised together (serving/batching.py); priming runs between batches."""

    name = "Denoiser"

    def __init__(self, cfg: dict, checkpoint: str | None) -> None:
        bind_replica_server_to_node_address()
        config = LiveTalkConfig.model_validate(cfg)
        core = DenoiserCore(config, checkpoint)
        self._setup(config, core, core.next_blocks)

    async def open(self, session_id: str, image: np.ndarray, prompt: str, seed: int) -> int:
        self._start_reaper()
        return await self.batcher.exclusive(self.core.open, session_id, image, prompt, seed)

    async def set_prompt(self, session_id: str, prompt: str) -> None:
        return await self.batcher.exclusive(self.core.set_prompt, session_id, prompt)

    async def next_block(self, session_id: str, samples: np.ndarray) -> tuple[LatentBlock, int]:
        self._start_reaper()
        return await self.batcher.submit(session_id, (session_id, samples))


async def reap_forever(sessions: SessionTable, idle_s: float, on_reaped=lambda: None) -> None:
    """Release sessions nobody has touched for `idle_s` (a client that vanished without DELETE)."""
    while True:
        await asyncio.sleep(min(idle_s, 30.0))
        if sessions.reap(idle_s):
            on_reaped()


def replica_actor_name() -> str:
    """The Ray actor name of this Serve replica (callers check with it that the replica holding a session lives)."""
    from ray import serve

    return serve.get_replica_context().replica_id.to_full_id_str()


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise) and the CUDA cache to the driver."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
