"""Session machinery every serving stage shares, free of torch so that the Ingress stays light: the
`SessionLost` error, a replica's `SessionTable` with idle reaping, and `SessionStage`, the base of the stateful
deployments (Denoiser, VAEDecoder): batcher, reaper, memory give-back and the numbers Serve and Prometheus read.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import time

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.serving.autoscaling import SESSIONS_METRIC
from livetalk_ray.serving.batching import MicroBatcher


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
    torch = sys.modules.get("torch")  # a process that never imported torch has no CUDA cache to give back
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
