"""Session routing for the stateful deployments: pin each session to the least loaded replica, then stick.

Ray's ConsistentHashRouter places sessions by hash, which is sticky but blind to load: with 2 replicas and
4 sessions, one replica gets 3 or 4 of them half the time, and with one real-time session per GPU two
sessions share a GPU while another idles. Adding a replica also moves about half the sessions (each one
re-primed). `SessionRouter` keeps the ring's strict affinity and retry loop but decides placement once:

- a session's first call goes to the replica with the fewest sessions pinned by this router (ties broken
  by a hash of session and replica, so a restarted router places the same way);
- every later call goes to the pinned replica while it lives, however busy (no fallback: only that
  replica holds the cache);
- a pinned replica that is gone (died, scaled in) is replaced by the least loaded one; the call finds no
  session there and the driver re-primes it;
- `close` unpins; a pin unused for `pin_idle_s` is forgotten (a session that ended without close).

A call may also name its replica: routing key `<session>@<replica id>` (serving/placement.py leases a Denoiser
and a VAEDecoder replica per session, one placement for every Ingress). It goes to that replica while it is a
candidate; once it is not (stopped, draining), the session's pin decides, and the call finds no session there.

A router lives in each caller process (an Ingress replica) and counts the sessions that caller pinned;
every session is driven by one Ingress, so the counts are exact per Ingress and balanced overall.
Calls without a session id are spread by the hash ring.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Hashable, Sequence

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

DEFAULT_PIN_IDLE_S = 3600.0
RELEASE_METHOD = "close"
TARGET_SEPARATOR = "@"


def routing_key(session_id: str, replica: str | None) -> str:
    """The key that sends a session's call to `replica` (a Serve replica's full id), or to its pin (None)."""
    return f"{session_id}{TARGET_SEPARATOR}{replica}" if replica else session_id


def _tie_break(session_id: str, replica: Hashable) -> bytes:
    return hashlib.blake2b(f"{session_id}|{replica}".encode(), digest_size=8).digest()


class SessionPins:
    """The placement policy, free of Ray: which replica (any hashable id) serves a session's call."""

    def __init__(self, idle_s: float = DEFAULT_PIN_IDLE_S) -> None:
        self.idle_s = idle_s
        self._pins: dict[str, list] = {}  # session → [replica, last used]

    def route(self, session_id: str, replicas: Sequence[Hashable], release: bool = False) -> Hashable | None:
        if not replicas:
            return None
        now = time.monotonic()
        pin = self._pins.get(session_id)
        if pin is not None and pin[0] in replicas:
            replica = pin[0]
        else:
            counts = Counter(r for r, _ in self._pins.values())
            replica = min(replicas, key=lambda r: (counts[r], _tie_break(session_id, r)))
        if release:
            self._pins.pop(session_id, None)
        else:
            self._pins[session_id] = [replica, now]
        self._forget_idle(now)
        return replica

    def load(self) -> Counter:
        return Counter(r for r, _ in self._pins.values())

    def _forget_idle(self, now: float) -> None:
        idle = [sid for sid, (_, used) in self._pins.items() if now - used > self.idle_s]
        for sid in idle:
            del self._pins[sid]


class SessionRouter(ConsistentHashRouter):
    """Serve RequestRouter with `SessionPins` placement; kwargs: `pin_idle_s`, plus the ring's own."""

    def initialize_state(self, **kwargs) -> None:
        self._pins = SessionPins(float(kwargs.pop("pin_idle_s", DEFAULT_PIN_IDLE_S)))
        super().initialize_state(**kwargs)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.metadata.session_id if pending_request is not None else None
        if not candidate_replicas or not key:
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True  # wait for the pinned replica, never reroute
        session_id, _, target = key.partition(TARGET_SEPARATOR)
        if target:
            named = [r for r in candidate_replicas if r.replica_id.to_full_id_str() == target]
            if named:
                return [named]
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        release = pending_request.metadata.call_method == RELEASE_METHOD
        chosen = self._pins.route(session_id, sorted(by_id, key=str), release=release)
        return [[by_id[chosen]]]
