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
from livetalk_ray.serving.autoscaling import QUEUED_METRIC, SESSIONS_METRIC, SLOTS_METRIC
from livetalk_ray.serving.batching import MicroBatcher

REPORT_EVERY_S = 1.0  # how often a stage replica tells Placement it lives (serving/placement.py)
REPORT_TIMEOUT_S = 5.0
MOVE_ASK_S = 5.0  # a draining replica's calls to Placement (which may be stopping with it)


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

    name = ""  # the deployment's name, for metrics and placement

    def _setup(self, cfg: LiveTalkConfig, core, run_batch, placement=None, slots: int = 1) -> None:
        """`placement`: the app's Placement handle (None in-process), told of this replica and its `slots`."""
        self.cfg, self.core = cfg, core
        self.batcher = MicroBatcher(run_batch, cfg.serve.batch_sessions, self.name)
        self.reaper: asyncio.Task | None = None
        self._trim_pending = False  # a release of freed memory is scheduled
        self.placement, self.slots = placement, slots
        self.draining = False
        self.queued = 0  # sessions waiting for slots app-wide, as Placement last said (autoscaling demand)
        self.reporter: asyncio.Task | None = None
        if placement is not None:
            try:  # Serve runs a sync constructor on the replica's event loop; report at once if it does
                self.reporter = asyncio.get_running_loop().create_task(self._report_forever())
            except RuntimeError:
                pass

    def _start_reaper(self) -> None:  # needs the replica's running event loop, which __init__ may not have
        if self.reaper is None:
            idle_s = self.cfg.serve.session_idle_s
            self.reaper = asyncio.create_task(reap_forever(self.core.sessions, idle_s, self._memory_back))
        if self.placement is not None and self.reporter is None:
            self.reporter = asyncio.create_task(self._report_forever())

    async def _report_forever(self) -> None:
        """Tell Placement every second that this replica lives, its slots, and whether it drains."""
        me = replica_actor_name()
        while True:
            try:
                report = self.placement.report.remote(self.name, me, self.slots, self.draining)
                self.queued = await asyncio.wait_for(report, REPORT_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - Placement restarting: the next report re-registers this replica
                pass
            await asyncio.sleep(REPORT_EVERY_S)

    def __del__(self):
        """Serve's graceful shutdown (scale-in, redeploy) calls this once the replica takes no new calls and awaits
        what it returns: the drain. Garbage collection of an in-process stage (no Placement) drains nothing."""
        if getattr(self, "placement", None) is None or self.draining:
            return None
        self.draining = True
        return self._drain()

    async def _drain(self) -> None:
        """Move every session of this replica to the replica Placement names, so its stream goes on where it was
        instead of being re-primed."""
        from ray import serve

        if not len(self.core.sessions):  # nothing to move (e.g. the app is being deleted after its sessions)
            return
        context = serve.get_replica_context()
        try:  # Placement may be stopping too (the whole app is being deleted): then nothing can move
            moves = await asyncio.wait_for(self.placement.drain.remote(self.name, replica_actor_name()), MOVE_ASK_S)
        except Exception:  # noqa: BLE001 - the sessions re-prime wherever they are placed next
            return
        peers = serve.get_deployment_handle(context.deployment, context.app_name)
        await asyncio.gather(*(self._move(peers, sid, target) for sid, target in moves))

    async def _move(self, peers, session_id: str, target: str | None) -> None:
        """Export one session, import it on `target`, and tell Placement where it lives now (None: lost)."""
        from livetalk_ray.serving.routing import routing_key

        started, placed = time.monotonic(), None
        try:
            snapshot = await self.batcher.exclusive(self.core.export_session, session_id, True)
            if target is not None:
                call = peers.options(session_id=routing_key(session_id, target)).import_session.remote(
                    session_id, snapshot
                )
                await asyncio.wait_for(call, self.cfg.serve.stage_timeout_s)
                placed = target
        except Exception:  # noqa: BLE001 - the session re-primes where Placement puts it next
            placed = None
        try:
            took = round(time.monotonic() - started, 4)
            await asyncio.wait_for(self.placement.moved.remote(session_id, self.name, placed, took), MOVE_ASK_S)
        except Exception:  # noqa: BLE001 - its driver finds the session where it is, or re-primes it
            pass
        outcome = "moved" if placed else "lost"
        metrics.record(metrics.SERVE_MIGRATIONS, stage=self.name, outcome=outcome)
        if placed:
            metrics.record(metrics.SERVE_MIGRATION_SECONDS, time.monotonic() - started, stage=self.name)

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
        return {
            SESSIONS_METRIC: float(len(self.core.sessions)),
            QUEUED_METRIC: float(self.queued),
            SLOTS_METRIC: float(self.slots),
        }

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
