"""Load generator for a running server: N concurrent WebSocket sessions for a fixed time, as real clients.

Each session POSTs a bundled portrait, reads its WebSocket like a browser (every block, every event) and
DELETEs itself at the end. Reported: sessions admitted at once, queued (202, and how long they waited for
slots) and refused (503: not a drop, the server said so), sessions dropped (closed early, error event, or failed
to start), how many admitted sessions held real time (inter-block gap p99 ≤ 1.2x the block), time to first frame,
the gap between consecutive blocks (p50/p99), frames per second per session, migration pauses, and —
when a memory probe is given (the server runs on this machine) — the resident memory of every Serve
replica over the run, so a leak shows as growth after warm-up.

`livetalk loadtest` is the command; `bench/load.py` runs it against a local server and keeps the JSON.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from websockets.sync.client import connect

from livetalk_ray.serving.protocol import decode_block


@dataclass
class SessionResult:
    index: int
    ttff_s: float | None = None  # POST sent → first block received
    arrivals: list[float] = field(default_factory=list)
    block_frames: list[int] = field(default_factory=list)
    fps: int | None = None
    error: str | None = None  # why the session counts as dropped
    admission: str = "admitted"  # admitted | queued | refused
    queue_wait_s: float | None = None  # a queued session: POST → its `admitted` event
    migration_pauses: list[float] = field(default_factory=list)  # `migrated` events: the stream's pause per move

    @property
    def real_time(self) -> bool | None:
        """Whether the stream kept real time: gap p99 ≤ 1.2x its block's play time (None: too few blocks)."""
        if len(self.gaps) < 4 or not self.fps:
            return None
        block_s = float(np.median(self.block_frames[1:])) / self.fps
        return float(np.percentile(self.gaps, 99)) <= REAL_TIME_SLACK * block_s

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.arrivals[1:])) if len(self.arrivals) > 2 else []  # block 0 → 1 includes priming


QUEUE_PATIENCE_S = 1800.0  # how long a queued session waits for its slots before it counts as dropped
REAL_TIME_SLACK = 1.2  # a block may arrive this many block times after the one before and still count as real time


@dataclass
class LoadReport:
    sessions: int
    seconds: float
    dropped: int
    errors: list[str]
    admitted: int  # at once (201)
    queued: int  # 202: waited for slots
    refused: int  # 503 with Retry-After: the queue was full
    held_real_time: int  # streaming sessions whose gap p99 stayed ≤ 1.2x the block time
    queue_wait_p50_s: float | None
    queue_wait_max_s: float | None
    migrations: int
    migration_pause_max_s: float | None
    ttff_p50_s: float | None
    ttff_p99_s: float | None
    gap_p50_s: float | None
    gap_p99_s: float | None
    fps_per_session: float | None
    memory_mb: dict[str, list[float]]  # deployment → RSS samples (MB), summed over its replicas
    memory_growth_mb: dict[str, float]  # lowest RSS of the second half minus that of the first (after warm-up)

    def to_json(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(measure, value) rows for a table."""

        def fmt(value: float | None, unit: str = "s") -> str:
            return "–" if value is None else f"{value:.3f} {unit}"

        streaming = self.sessions - self.refused - self.dropped
        rows = [
            ("admitted / queued / refused (503)", f"{self.admitted} / {self.queued} / {self.refused}"),
            ("sessions dropped", f"{self.dropped} of {self.sessions}"),
            ("streaming sessions at real time (gap p99 ≤ 1.2x block)", f"{self.held_real_time} of {streaming}"),
            ("queue wait p50 / max", f"{fmt(self.queue_wait_p50_s)} / {fmt(self.queue_wait_max_s)}"),
            ("migrations, longest pause", f"{self.migrations}, {fmt(self.migration_pause_max_s)}"),
            ("time to first frame p50 / p99", f"{fmt(self.ttff_p50_s)} / {fmt(self.ttff_p99_s)}"),
            ("inter-block gap p50 / p99", f"{fmt(self.gap_p50_s)} / {fmt(self.gap_p99_s)}"),
            ("frames per second per session", "–" if self.fps_per_session is None else f"{self.fps_per_session:.1f}"),
        ]
        for name, samples in self.memory_mb.items():
            growth = self.memory_growth_mb.get(name)
            after = "–" if growth is None else f"{growth:+.0f}"
            rows.append(
                (f"{name} RSS MB: first, last (floor growth)", f"{samples[0]:.0f}, {samples[-1]:.0f} ({after})")
            )
        return rows


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _one_session(base: str, token: str | None, portrait: str, seconds: float, result: SessionResult) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        t0 = time.perf_counter()
        reply = httpx.post(base + "/v1/sessions", data={"portrait": portrait}, headers=headers, timeout=120)
        if reply.status_code == 503 and "Retry-After" in reply.headers:
            result.admission = "refused"
            return
        if reply.status_code not in (201, 202):
            result.error = f"POST /v1/sessions: {reply.status_code} {reply.text[:200]}"
            return
        session = reply.json()
        result.fps = session["fps"]
        if reply.status_code == 202:
            result.admission = "queued"
        origin = urlsplit(base)._replace(path="", query="").geturl()  # the ws path carries any route prefix
        url = origin.replace("http", "ws", 1) + session["ws"] + (f"?token={token}" if token else "")
        end = time.monotonic() + seconds
        waiting = reply.status_code == 202  # queued: it streams for `seconds` once admitted
        with connect(url, max_size=None, open_timeout=60) as ws:
            while waiting or time.monotonic() < end:
                message = ws.recv(timeout=QUEUE_PATIENCE_S if waiting else max(30.0, end - time.monotonic()))
                if isinstance(message, bytes):
                    now = time.perf_counter()
                    result.arrivals.append(now)
                    result.block_frames.append(len(decode_block(message)[1]))
                    if result.ttff_s is None:
                        result.ttff_s = now - t0
                elif '"error"' in message:
                    result.error = f"error event: {message[:200]}"
                    return
                elif '"admitted"' in message:
                    result.queue_wait_s = time.perf_counter() - t0
                    waiting, end = False, time.monotonic() + seconds
                elif '"migrated"' in message:
                    result.migration_pauses.append(json.loads(message)["pause_s"])
        httpx.delete(base + f"/v1/sessions/{session['session_id']}", headers=headers, timeout=60)
    except Exception as exc:  # noqa: BLE001 - any failure drops this session; the report says which
        result.error = f"{type(exc).__name__}: {exc}"


_REPLICA_TITLE = (re.compile(r"ServeReplica:([^:\s]+):(\w+)"), re.compile(r"SERVE_REPLICA::([^#\s]+)#(\w+)#"))


def local_replicas(app: str) -> list[tuple[str, psutil.Process]]:
    """(deployment, process) of every replica of `app` running on this machine, found by process title."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        for pattern in _REPLICA_TITLE:
            match = pattern.search(title)
            if match and match.group(1) == app:
                out.append((match.group(2), proc))
                break
    return out


def local_replica_memory(app: str) -> dict[str, float]:
    """RSS in MB per deployment of `app`, summed over its replica processes on this machine."""
    out: dict[str, float] = {}
    for deployment, proc in local_replicas(app):
        try:
            out[deployment] = out.get(deployment, 0.0) + proc.memory_info().rss / 2**20
        except psutil.Error:  # ended meanwhile
            pass
    return out


def run_load(
    base_url: str,
    sessions: int,
    seconds: float,
    *,
    token: str | None = None,
    portrait: str = "ada",
    memory_probe: Callable[[], dict[str, float]] | None = None,
    sample_every_s: float = 2.0,
    warmup_share: float = 0.25,
    progress: Callable[[float], None] | None = None,
) -> LoadReport:
    """Run `sessions` concurrent sessions for `seconds` each; `progress(fraction)` is called while waiting."""
    if sessions < 1 or seconds <= 0:
        raise ValueError("need at least one session and a positive duration")
    base = base_url.rstrip("/")
    results = [SessionResult(i) for i in range(sessions)]
    threads = [
        threading.Thread(target=_one_session, args=(base, token, portrait, seconds, r), daemon=True) for r in results
    ]
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if memory_probe is not None:
            samples.append((time.monotonic() - start, memory_probe()))
        if progress is not None:
            progress(min(1.0, (time.monotonic() - start) / seconds))
        for t in threads:
            t.join(timeout=sample_every_s / len(threads))
    memory: dict[str, list[float]] = {}
    growth: dict[str, float] = {}
    for name in sorted({n for _, s in samples for n in s}):
        memory[name] = [round(s.get(name, 0.0), 1) for _, s in samples]
        # Working memory swings by a batch's temporaries (hundreds of MB for CPU convolutions), so compare
        # floors: retained memory (a leak) raises the low point of the run's second half above that of its
        # first half (after warm-up); temporaries do not.
        cut = warmup_share * seconds
        mid = cut + (seconds - cut) / 2
        first = [s[name] for t, s in samples if cut <= t < mid and name in s]
        second = [s[name] for t, s in samples if t >= mid and name in s]
        if first and second:
            growth[name] = round(min(second) - min(first), 1)
    ttffs = [r.ttff_s for r in results if r.ttff_s is not None]
    gaps = [g for r in results for g in r.gaps]
    fps = [sum(r.block_frames[1:]) / (r.arrivals[-1] - r.arrivals[0]) for r in results if len(r.arrivals) > 2]
    errors = [f"session {r.index}: {r.error}" for r in results if r.error]
    waits = [r.queue_wait_s for r in results if r.queue_wait_s is not None]
    pauses = [p for r in results for p in r.migration_pauses]
    return LoadReport(
        sessions=sessions,
        seconds=seconds,
        dropped=len(errors),
        errors=errors,
        admitted=sum(r.admission == "admitted" for r in results),
        queued=sum(r.admission == "queued" for r in results),
        refused=sum(r.admission == "refused" for r in results),
        held_real_time=sum(bool(r.real_time) for r in results if not r.error),
        queue_wait_p50_s=_percentile(waits, 50),
        queue_wait_max_s=max(waits, default=None),
        migrations=len(pauses),
        migration_pause_max_s=max(pauses, default=None),
        ttff_p50_s=_percentile(ttffs, 50),
        ttff_p99_s=_percentile(ttffs, 99),
        gap_p50_s=_percentile(gaps, 50),
        gap_p99_s=_percentile(gaps, 99),
        fps_per_session=float(np.mean(fps)) if fps else None,
        memory_mb=memory,
        memory_growth_mb=growth,
    )
