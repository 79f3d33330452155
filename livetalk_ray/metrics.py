"""Every `livetalk_*` metric, defined once.

Inside Ray processes (tasks, actors, replicas and a driver connected to Ray) metrics go through
`ray.util.metrics` and Ray's per-node agent (exported with a `ray_` prefix); outside Ray they use
`prometheus_client`. Labels never carry per-session or per-clip ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = tuple(LATENCY_BUCKETS)


DATA_CLIPS = MetricSpec("livetalk_data_clips", "counter", "Clips finished by the data pipeline", ("outcome",))
DATA_QUARANTINED = MetricSpec(
    "livetalk_data_quarantined", "counter", "Clips quarantined, by stage and reason", ("stage", "reason")
)
DATA_STAGE_SECONDS = MetricSpec(
    "livetalk_data_stage_seconds", "histogram", "Seconds per clip spent in each data stage", ("stage",)
)

# Serving. Per-deployment series carry `deployment`; never a session id.
SERVE_SESSIONS = MetricSpec(
    "livetalk_serve_sessions", "gauge", "Sessions held by a replica (Ingress: driven; stages: cached)", ("deployment",)
)
SERVE_FRAMES = MetricSpec("livetalk_serve_frames", "counter", "Video frames streamed to clients")
SERVE_BLOCKS = MetricSpec("livetalk_serve_blocks", "counter", "Blocks streamed to clients")
SERVE_FIRST_FRAME_SECONDS = MetricSpec(
    "livetalk_serve_first_frame_seconds", "histogram", "Session creation to its first block published"
)
SERVE_STAGE_SECONDS = MetricSpec(
    "livetalk_serve_stage_seconds", "histogram", "Per-block latency of a stage call as the relay sees it", ("stage",)
)
SERVE_QUEUE_DEPTH = MetricSpec(
    "livetalk_serve_queue_depth", "gauge", "Blocks waiting for a replica's next batch", ("deployment",)
)
SERVE_BATCH_SIZE = MetricSpec(
    "livetalk_serve_batch_size",
    "histogram",
    "Sessions computed together in one batch",
    ("deployment",),
    (1, 2, 3, 4, 6, 8, 12, 16, 32),
)
SERVE_REPRIMES = MetricSpec("livetalk_serve_reprimes", "counter", "Sessions re-primed after a lost stage")
SERVE_SESSION_ERRORS = MetricSpec(
    "livetalk_serve_session_errors", "counter", "Sessions ended by an error event", ("reason",)
)

SERVE_MIGRATIONS = MetricSpec(
    "livetalk_serve_migrations",
    "counter",
    "Sessions a draining replica moved to another (outcome moved) or could not (lost: re-primed)",
    ("stage", "outcome"),
)
SERVE_MIGRATION_SECONDS = MetricSpec(
    "livetalk_serve_migration_seconds", "histogram", "A drained session's export and import", ("stage",)
)
SERVE_ADMISSIONS = MetricSpec(
    "livetalk_serve_admissions", "counter", "New sessions by admission: admitted, queued, refused", ("outcome",)
)
SERVE_QUEUE_WAIT_SECONDS = MetricSpec(
    "livetalk_serve_queue_wait_seconds", "histogram", "A queued session's wait for its slots"
)

SERVE_LLM_FIRST_SENTENCE_SECONDS = MetricSpec(
    "livetalk_serve_llm_first_sentence_seconds", "histogram", "LLM: a user turn to the first sentence of the reply"
)
SERVE_LLM_SENTENCES = MetricSpec("livetalk_serve_llm_sentences", "counter", "LLM: reply sentences streamed")
SERVE_SPEECH_SECONDS = MetricSpec(
    "livetalk_serve_speech_seconds", "histogram", "Speech: seconds to synthesize one sentence"
)
SERVE_VOICE_TURNS = MetricSpec(
    "livetalk_serve_voice_turns", "counter", "User turns heard in conversation mode, by how they ended", ("ending",)
)
SERVE_BARGE_INS = MetricSpec("livetalk_serve_barge_ins", "counter", "Avatar answers cut because the user spoke")
SERVE_TURN_TO_SPEECH_SECONDS = MetricSpec(
    "livetalk_serve_turn_to_speech_seconds", "histogram", "End of the user's turn to the avatar's first speech queued"
)

# Training: every stage's loop (role = vae | teacher | ode) and the DMD roles and controller.
TRAIN_STEP_SECONDS = MetricSpec(
    "livetalk_train_step_seconds", "histogram", "Seconds per optimizer step (or scoring call) of a role", ("role",)
)
TRAIN_STEPS = MetricSpec("livetalk_train_steps", "counter", "Optimizer steps taken", ("role",))
TRAIN_SAMPLES_PER_S = MetricSpec("livetalk_train_samples_per_second", "gauge", "Training throughput", ("role",))
TRAIN_LOSS = MetricSpec("livetalk_train_loss", "gauge", "Latest loss of a role", ("role", "loss"))
TRAIN_STALENESS = MetricSpec(
    "livetalk_train_staleness", "gauge", "DMD: generator versions between a rollout's weights and the newest"
)

ALL_METRICS = [
    DATA_CLIPS,
    DATA_QUARANTINED,
    DATA_STAGE_SECONDS,
    SERVE_SESSIONS,
    SERVE_FRAMES,
    SERVE_BLOCKS,
    SERVE_FIRST_FRAME_SECONDS,
    SERVE_STAGE_SECONDS,
    SERVE_QUEUE_DEPTH,
    SERVE_BATCH_SIZE,
    SERVE_REPRIMES,
    SERVE_SESSION_ERRORS,
    SERVE_LLM_FIRST_SENTENCE_SECONDS,
    SERVE_LLM_SENTENCES,
    SERVE_SPEECH_SECONDS,
    SERVE_VOICE_TURNS,
    SERVE_BARGE_INS,
    SERVE_TURN_TO_SPEECH_SECONDS,
    SERVE_ADMISSIONS,
    SERVE_QUEUE_WAIT_SECONDS,
    SERVE_MIGRATIONS,
    SERVE_MIGRATION_SECONDS,
    TRAIN_STEP_SECONDS,
    TRAIN_STEPS,
    TRAIN_SAMPLES_PER_S,
    TRAIN_LOSS,
    TRAIN_STALENESS,
]


@functools.cache
def _ray_metric(spec: MetricSpec):
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags)


@functools.cache
def _prom_metric(spec: MetricSpec):
    import prometheus_client as prom

    if spec.kind == "counter":
        return prom.Counter(spec.name, spec.description, spec.tags)
    if spec.kind == "gauge":
        return prom.Gauge(spec.name, spec.description, spec.tags)
    return prom.Histogram(spec.name, spec.description, spec.tags, buckets=spec.buckets)


def _in_ray() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


def record(spec: MetricSpec, value: float = 1.0, **tags: str) -> None:
    """Add to a counter, set a gauge or observe a histogram, through Ray or prometheus_client."""
    if spec.kind == "counter" and value <= 0:
        return  # Ray counters reject zero increments; nothing to count
    if _in_ray():
        metric = _ray_metric(spec)
        if spec.kind == "counter":
            metric.inc(value, tags=tags or None)
        elif spec.kind == "gauge":
            metric.set(value, tags=tags or None)
        else:
            metric.observe(value, tags=tags or None)
        return
    metric = _prom_metric(spec)
    metric = metric.labels(**tags) if spec.tags else metric
    if spec.kind == "counter":
        metric.inc(value)
    elif spec.kind == "gauge":
        metric.set(value)
    else:
        metric.observe(value)


def exported_name(spec: MetricSpec, through_ray: bool = True) -> str:
    """The family name Prometheus stores: Ray prefixes `ray_`; counters end in `_total`."""
    name = ("ray_" if through_ray else "") + spec.name
    return name + "_total" if spec.kind == "counter" else name


def record_training(role: str, entry: dict) -> None:
    """Metrics of one training log entry (a metrics.jsonl line): losses, throughput, staleness."""
    for key, value in entry.items():
        if key == "loss" or key.endswith("_loss"):
            record(TRAIN_LOSS, float(value), role=role, loss=key)
    if "samples_per_s" in entry:
        record(TRAIN_SAMPLES_PER_S, float(entry["samples_per_s"]), role=role)
    if "staleness" in entry:
        record(TRAIN_STALENESS, float(entry["staleness"]))
