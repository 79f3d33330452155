"""Autoscaling stateful deployments on the sessions they hold, not on their ongoing calls.

Serve's default policy scales on ongoing requests. A Denoiser's calls are short (one block each) and a
session makes one at a time, so ongoing requests understate the load: three unpaced toy sessions kept
one replica under 0.5 ongoing requests while it held all three KV caches. What a replica really carries
is its sessions (cache memory, one block of compute each per block period), so this policy asks for
`ceil(sessions / sessions_per_replica)` replicas. Serve still applies min/max, scaling factors and the
up/down delays around it.

Replicas report their session count through `record_autoscaling_stats` (Denoiser, VAEDecoder and ASR). Use in
a deployment's `autoscaling_config`:

    policy:
      policy_function: livetalk_ray.serving.autoscaling:SessionLoad
      policy_kwargs: {sessions_per_replica: 2}

Scaling moves sessions: the consistent-hash ring sends part of the keys to a new replica (or away from a
removed one), and those sessions are re-primed from their reference image (serving/session.py).
"""

from __future__ import annotations

import math
from typing import Any

SESSIONS_METRIC = "sessions"


class SessionLoad:
    def __init__(self, sessions_per_replica: float = 4.0) -> None:
        if sessions_per_replica <= 0:
            raise ValueError(f"sessions_per_replica must be positive, got {sessions_per_replica}")
        self.sessions_per_replica = sessions_per_replica

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """ctx: Serve's AutoscalingContext. Replicas that have not reported yet count as holding none."""
        per_replica = (ctx.aggregated_metrics or {}).get(SESSIONS_METRIC, {})
        if not per_replica:  # no report yet (replicas starting): keep what there is
            return ctx.target_num_replicas, {}
        sessions = sum(per_replica.values())
        return math.ceil(round(sessions, 6) / self.sessions_per_replica), {}
