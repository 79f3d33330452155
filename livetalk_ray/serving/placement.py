"""One placement for the whole app: real-time session slots, leases, the admission queue, and migrations.

Every Ingress replica asks the single `Placement` replica where a new session may stream, so two Ingress replicas
can never overfill one Denoiser. A session is admitted only when a Denoiser and a VAEDecoder replica both have a
free slot (leased together); otherwise it waits in a bounded FIFO queue, and past the queue it is refused. The
stage replicas report themselves (slots, sessions, draining) every second; Ingress replicas renew their leases.

- A replica that stops reporting is forgotten; its sessions re-prime on the replica `reassign` picks.
- A lease its Ingress stops renewing (the Ingress died) is freed, and so is a queue entry nobody polls.
- A replica being scaled in calls `drain`: each of its sessions gets a target replica, is exported there, and the
  driver that finds its session gone asks `relocate`, which answers with the new replica once the move is done.

`PlacementBook` is the policy, free of Ray and clocks (tests drive it with `now`); `Placement` is the deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

STAGES = ("Denoiser", "VAEDecoder")
REPLICA_TTL_S = 5.0  # a replica silent this long is gone
QUEUE_POLL_TTL_S = 10.0  # a queued session whose Ingress stopped asking this long is dropped from the queue


@dataclass
class ReplicaSlots:
    slots: int
    seen: float
    draining: bool = False


@dataclass
class Lease:
    replicas: dict[str, str | None]  # stage → the replica id holding the session there (None: to be re-placed)
    holder: str  # the Ingress replica driving the session
    renewed: float
    moving: dict[str, str] = field(default_factory=dict)  # stage → target, while a drain moves the session


@dataclass
class Waiting:
    holder: str
    polled: float


def _tie_break(session_id: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{session_id}|{replica}".encode(), digest_size=8).digest()


class PlacementBook:
    def __init__(self, max_queue: int, lease_ttl_s: float, expected_session_s: float = 300.0) -> None:
        self.max_queue, self.lease_ttl_s = max_queue, lease_ttl_s
        self.replicas: dict[str, dict[str, ReplicaSlots]] = {stage: {} for stage in STAGES}
        self.leases: dict[str, Lease] = {}
        self.queue: OrderedDict[str, Waiting] = OrderedDict()
        self.releases: deque[float] = deque(maxlen=32)  # when leases ended, for the queue's wait estimate
        self.expected_session_s = expected_session_s  # the wait estimate before any session has ended
        self.moves: deque[dict] = deque(maxlen=256)  # finished drain moves, for status (operators, benchmarks)

    # ---- stage replicas
    def report(self, stage: str, replica: str, slots: int, draining: bool, now: float) -> int:
        """A stage replica is alive (`slots` per replica, `draining` once it is being stopped). Returns the queue
        length, which its autoscaling reports as demand."""
        known = self.replicas[stage].get(replica)
        if known is None:
            self.replicas[stage][replica] = ReplicaSlots(slots, now, draining)
            self._admit_waiting(now)
        else:
            known.slots, known.seen, known.draining = slots, now, known.draining or draining
        return len(self.queue)

    def load(self, stage: str) -> dict[str, int]:
        """Sessions leased on each live replica of a stage."""
        counts = dict.fromkeys(self.replicas[stage], 0)
        for lease in self.leases.values():
            replica = lease.replicas.get(stage)
            if replica in counts:
                counts[replica] += 1
        return counts

    def free_slots(self, stage: str) -> int:
        load = self.load(stage)
        return sum(max(0, r.slots - load[name]) for name, r in self.replicas[stage].items() if not r.draining)

    def _pick(self, stage: str, session_id: str, exclude: tuple[str, ...] = (), need_free: bool = True) -> str | None:
        """The least loaded live replica of `stage` (with a free slot if `need_free`), ties broken by hash."""
        load = self.load(stage)
        open_ = [
            name
            for name, r in self.replicas[stage].items()
            if not r.draining and name not in exclude and (not need_free or load[name] < r.slots)
        ]
        if not open_:
            return None
        slots = self.replicas[stage]
        return min(open_, key=lambda name: (load[name] / slots[name].slots, _tie_break(session_id, name)))

    # ---- admission
    def admit(self, session_id: str, holder: str, now: float) -> dict:
        """{"lease": {stage: replica}} | {"queued": {"position", "estimated_wait_s"}} | {"full": {...}}. A queued
        session asks again (every half second or so) and gets its lease once it reaches the front."""
        self.expire(now)
        lease = self.leases.get(session_id)
        if lease is not None:
            lease.renewed = now
            return {"lease": dict(lease.replicas)}
        if session_id not in self.queue and not self.queue and self._grant(session_id, holder, now):
            return {"lease": dict(self.leases[session_id].replicas)}
        if session_id not in self.queue:
            if len(self.queue) >= self.max_queue:
                return {"full": {"queue": len(self.queue), "estimated_wait_s": self.estimated_wait_s(1)}}
            self.queue[session_id] = Waiting(holder, now)
        self.queue[session_id].polled = now
        position = list(self.queue).index(session_id) + 1
        return {"queued": {"position": position, "estimated_wait_s": self.estimated_wait_s(position)}}

    def _grant(self, session_id: str, holder: str, now: float) -> bool:
        chosen = {stage: self._pick(stage, session_id) for stage in STAGES}
        if any(replica is None for replica in chosen.values()):
            return False
        self.leases[session_id] = Lease(chosen, holder, now)
        return True

    def _admit_waiting(self, now: float) -> None:
        """Give freed slots to the queue's front, in order."""
        while self.queue:
            session_id, waiting = next(iter(self.queue.items()))
            if not self._grant(session_id, waiting.holder, now):
                return
            del self.queue[session_id]

    def estimated_wait_s(self, position: int) -> float:
        """Until the `position`-th waiting session is admitted, from how often leases ended lately."""
        if len(self.releases) >= 2:
            span = self.releases[-1] - self.releases[0]
            every = span / (len(self.releases) - 1)
        else:
            slots = sum(r.slots for r in self.replicas["Denoiser"].values() if not r.draining) or 1
            every = self.expected_session_s / slots
        return round(position * every, 1)

    def renew(self, holder: str, leases: dict[str, dict[str, str | None]], now: float) -> None:
        """An Ingress replica's heartbeat for the sessions it streams, with where each streams now (after a re-prime
        the router may have placed it). A lease this book does not hold (Placement restarted and lost its memory)
        is taken back as it is."""
        for session_id, replicas in leases.items():
            lease = self.leases.get(session_id)
            if lease is None:
                self.queue.pop(session_id, None)
                self.leases[session_id] = Lease(dict(replicas), holder, now)
                continue
            lease.renewed, lease.holder = now, holder
            for stage, replica in replicas.items():
                if replica is not None and stage not in lease.moving:
                    lease.replicas[stage] = replica

    def release(self, session_id: str, now: float) -> None:
        self.queue.pop(session_id, None)
        if self.leases.pop(session_id, None) is not None:
            self.releases.append(now)
            self._admit_waiting(now)

    def expire(self, now: float) -> None:
        """Forget silent replicas, leases nobody renews and queue entries nobody polls; admit into what freed up."""
        for stage in STAGES:
            for name in [n for n, r in self.replicas[stage].items() if now - r.seen > REPLICA_TTL_S]:
                del self.replicas[stage][name]
        for session_id in [s for s, lease in self.leases.items() if now - lease.renewed > self.lease_ttl_s]:
            self.release(session_id, now)
        for session_id in [s for s, w in self.queue.items() if now - w.polled > QUEUE_POLL_TTL_S]:
            del self.queue[session_id]
        self._admit_waiting(now)

    # ---- moving sessions
    def drain(self, stage: str, replica: str, now: float) -> list[tuple[str, str | None]]:
        """`replica` is being stopped: no new sessions, and a target for each of its sessions (a replica with a
        free slot, else the least loaded one: a move beats a reset; None when no other replica lives)."""
        slots = self.replicas[stage].setdefault(replica, ReplicaSlots(1, now))
        slots.draining = True
        moves = []
        for session_id, lease in self.leases.items():
            if lease.replicas.get(stage) != replica:
                continue
            target = self._pick(stage, session_id, (replica,)) or self._pick(stage, session_id, (replica,), False)
            if target is not None:
                lease.moving[stage] = target
            moves.append((session_id, target))
        return moves

    def moved(self, session_id: str, stage: str, target: str | None, seconds: float | None = None) -> None:
        """A drain's move ended: the session now lives on `target`, or (None) it failed and must re-prime;
        `seconds`: the export and import."""
        self.moves.append({"session": session_id, "stage": stage, "moved": target is not None, "seconds": seconds})
        lease = self.leases.get(session_id)
        if lease is not None:
            lease.moving.pop(stage, None)
            lease.replicas[stage] = target

    def where(self, session_id: str, stage: str) -> tuple[str | None, bool]:
        """(the replica holding the session on `stage`, whether a move of it is under way)."""
        lease = self.leases.get(session_id)
        if lease is None:
            return None, False
        return lease.replicas.get(stage), stage in lease.moving

    def draining(self, stage: str, replica: str | None) -> bool:
        known = self.replicas[stage].get(replica) if replica else None
        return known is not None and known.draining

    def reassign(self, session_id: str, stage: str, avoid: str | None, now: float) -> str | None:
        """A replica for a session that must re-prime on `stage` (its replica died or stopped answering)."""
        lease = self.leases.get(session_id)
        if lease is None:
            return None
        exclude = (avoid,) if avoid else ()
        lease.replicas[stage] = None  # do not count the old place while choosing
        target = self._pick(stage, session_id, exclude) or self._pick(stage, session_id, exclude, False)
        lease.replicas[stage], lease.renewed = target, now
        return target

    def status(self) -> dict:
        return {
            "replicas": {
                stage: {
                    name: {"slots": r.slots, "sessions": self.load(stage)[name], "draining": r.draining}
                    for name, r in self.replicas[stage].items()
                }
                for stage in STAGES
            },
            "leases": {sid: {**lease.replicas, "holder": lease.holder} for sid, lease in self.leases.items()},
            "queue": list(self.queue),
            "moves": list(self.moves),
        }


class Placement:
    """Serve deployment class (one replica; serving/app.py). All state is in memory and rebuilt from reports and
    renewals if the replica restarts: stage replicas report within a second, Ingress replicas re-admit lost leases."""

    def __init__(self, cfg: dict) -> None:
        from livetalk_ray.config import LiveTalkConfig
        from livetalk_ray.serving.replica_ports import bind_replica_server_to_node_address

        bind_replica_server_to_node_address()  # its gRPC server listens on the node's address, not on every one
        admission = LiveTalkConfig.model_validate(cfg).serve.admission
        self.book = PlacementBook(admission.max_queue, admission.lease_ttl_s)
        self.changed = asyncio.Event()  # set on every move's end, so `relocate` waits without polling hard

    async def report(self, stage: str, replica: str, slots: int, draining: bool = False) -> int:
        self.book.expire(time.monotonic())  # replicas report every second: expiry needs no timer of its own
        return self.book.report(stage, replica, slots, draining, time.monotonic())

    async def admit(self, session_id: str, holder: str) -> dict:
        return self.book.admit(session_id, holder, time.monotonic())

    async def renew(self, holder: str, leases: dict[str, dict[str, str | None]]) -> None:
        self.book.renew(holder, leases, time.monotonic())
        self.book.expire(time.monotonic())

    async def release(self, session_id: str) -> None:
        self.book.release(session_id, time.monotonic())

    async def drain(self, stage: str, replica: str) -> list[tuple[str, str | None]]:
        moves = self.book.drain(stage, replica, time.monotonic())
        self.changed.set()
        return moves

    async def moved(self, session_id: str, stage: str, target: str | None, seconds: float | None = None) -> None:
        self.book.moved(session_id, stage, target, seconds)
        self.changed.set()

    async def relocate(self, session_id: str, stage: str, lost: str | None, wait_s: float) -> str | None:
        """Where a session went that its driver found missing on replica `lost`: the new replica once a drain has
        moved it (waiting up to `wait_s` for the drain to begin, and for a begun move to end), or None: re-prime."""
        deadline = time.monotonic() + wait_s
        while True:
            replica, moving = self.book.where(session_id, stage)
            if not moving:
                if replica is not None and replica != lost:
                    return replica
                if replica is None or self.book.draining(stage, lost) or time.monotonic() >= deadline:
                    return None
            wait = 1.0 if moving else deadline - time.monotonic()  # a move ends within its own timeout
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(wait, 0.01))
            except TimeoutError:
                pass

    async def reassign(self, session_id: str, stage: str, avoid: str | None) -> str | None:
        return self.book.reassign(session_id, stage, avoid, time.monotonic())

    async def ready(self) -> bool:
        """Every stage has at least one replica reporting (the Ingress's readiness check)."""
        self.book.expire(time.monotonic())
        return all(self.book.replicas[stage] for stage in STAGES)

    async def status(self) -> dict:
        return self.book.status()


class PlacementClient:
    """Placement as an Ingress and its session drivers call it: every call bounded by a timeout."""

    def __init__(self, handle, timeout_s: float) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    async def call(self, method: str, *args, timeout: float | None = None):
        return await asyncio.wait_for(getattr(self.handle, method).remote(*args), timeout or self.timeout_s)

    async def relocate(self, stage, wait_s: float) -> str | None:
        """The replica a drain moved `stage`'s session to (a `serving.stage.Stage` that found it missing), or None
        when it was not moved (its replica died or hung): the driver re-primes it. A replica that still lives may
        be draining: Placement waits up to `wait_s` for the move."""
        from livetalk_ray.serving.stage import replica_alive

        if not stage.is_handle:  # an in-process stage has no other replica to move to
            return None
        alive = stage.replica is not None and await replica_alive(stage.replica)
        wait_s = wait_s if alive else 0.0
        try:
            return await self.call("relocate", stage.session_id, stage.name, stage.replica, wait_s, timeout=wait_s + 60)
        except Exception:  # noqa: BLE001 - Placement unreachable: re-priming is the safe answer
            return None

    async def reassign(self, stage) -> None:
        """Place `stage`'s session on another replica before it is re-primed (away from the one that lost it)."""
        try:
            stage.place(await self.call("reassign", stage.session_id, stage.name, stage.replica))
        except Exception:  # noqa: BLE001 - Placement unreachable: the router's pin places it
            stage.place(None)
