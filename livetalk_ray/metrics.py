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

ALL_METRICS = [DATA_CLIPS, DATA_QUARANTINED, DATA_STAGE_SECONDS]


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
