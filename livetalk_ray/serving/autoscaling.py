"""Autoscaling stateful deployments on the sessions they hold, not on their ongoing calls.

Serve's default policy scales on ongoing requests. A Denoiser's calls are short (one block each) and a
session makes one at a time, so ongoing requests understate the load: three unpaced toy sessions kept
one replica under 0.5 ongoing requests while it held all three KV caches. What a replica really carries
is its sessions (cache memory, one block of compute each per block period), so this policy asks for
`ceil(sessions / sessions_per_replica)` replicas. Serve still applies min/max, scaling factors and the
up/down delays around it.

Sessions waiting for slots (serving/placement.py's admission queue) are demand too: the Denoiser and VAEDecoder
replicas report the app-wide queue length (each the same number, so the policy takes the largest, not the sum) and
their slots per replica, which is the default for `sessions_per_replica`.

Replicas report their session count through `record_autoscaling_stats` (Denoiser, VAEDecoder and ASR). Use in
a deployment's `autoscaling_config`:

    policy:
      policy_function: livetalk_ray.serving.autoscaling:SessionLoad
      policy_kwargs: {sessions_per_replica: 2}

Scaling in drains: a replica being stopped moves its sessions to the others (serving/sessions.py), so no stream
restarts; only a replica that dies outright leaves its sessions to be re-primed from their reference image.
"""

from __future__ import annotations

import math
from typing import Any

SESSIONS_METRIC = "sessions"
QUEUED_METRIC = "queued"
SLOTS_METRIC = "slots"
FALLBACK_SESSIONS_PER_REPLICA = 4.0  # a deployment that reports no slots (ASR)


class SessionLoad:
    def __init__(self, sessions_per_replica: float | None = None) -> None:
        if sessions_per_replica is not None and sessions_per_replica <= 0:
            raise ValueError(f"sessions_per_replica must be positive, got {sessions_per_replica}")
        self.sessions_per_replica = sessions_per_replica

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """ctx: Serve's AutoscalingContext. Replicas that have not reported yet count as holding none."""
        reported = ctx.aggregated_metrics or {}
        per_replica = reported.get(SESSIONS_METRIC, {})
        if not per_replica:  # no report yet (replicas starting): keep what there is
            return ctx.target_num_replicas, {}
        demand = sum(per_replica.values()) + max(reported.get(QUEUED_METRIC, {}).values(), default=0.0)
        slots = reported.get(SLOTS_METRIC, {})
        per = self.sessions_per_replica or max(slots.values(), default=0.0) or FALLBACK_SESSIONS_PER_REPLICA
        return math.ceil(round(demand, 6) / per), {}
