"""`livetalk data prepare`: Ray Data turns raw clips into training shards, quarantining with a reason.

    sources ─► decode + curate (tasks, one clip per task) ─► encode (actor pool: VAE, wav2vec2, umT5) ─► driver
                                                                       driver: shards, quarantine, stats

Clips are assigned to shards deterministically (sorted ids, `clips_per_shard` each). A shard is written
atomically once every one of its clips is accounted for, then marked done; a rerun skips done shards.
Rejected clips travel in the same stream as accepted ones (a status column), so nothing depends on a
shared filesystem between workers, and a clip whose task or actor died is quarantined as `worker_lost`.
Always: clips_in = accepted + quarantined.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Generator, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livetalk_ray import metrics
from livetalk_ray.config import ConfigError, LiveTalkConfig
from livetalk_ray.data.curation import Rejected, prepare_clip
from livetalk_ray.data.schema import QUARANTINE_SCHEMA, rows_to_table
from livetalk_ray.data.sources import ClipSource, discover
from livetalk_ray.errors import is_user_error

RESULT_COLUMNS = ("clip_id", "shard", "status", "stage", "reason", "detail", "payload", "seconds")


def _result(
    clip_id: str,
    shard: int,
    status: str,
    stage: str = "",
    reason: str = "",
    detail: str = "",
    payload: bytes = b"",
    seconds: dict | None = None,
) -> dict:
    return {
        "clip_id": clip_id,
        "shard": shard,
        "status": status,
        "stage": stage,
        "reason": reason,
        "detail": detail[:500],
        "payload": payload,
        "seconds": json.dumps(seconds or {}),
    }


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {c: np.array([r[c] for r in rows], dtype=object) for c in RESULT_COLUMNS}


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


# ------------------------------------------------------------------------------------------ stages
def decode_stage(batch: dict[str, np.ndarray], cfg_json: dict) -> dict[str, np.ndarray]:
    """Ray Data task: decode and curate each clip of the batch; a failure quarantines that clip only."""
    cfg = LiveTalkConfig.model_validate(cfg_json)
    out = []
    for row in _rows(batch):
        source = ClipSource(**json.loads(row["source"]))
        start = time.perf_counter()
        try:
            clip = prepare_clip(source, cfg)
            seconds = {"decode_curate": time.perf_counter() - start}
            out.append(_result(source.clip_id, row["shard"], "curated", payload=pickle.dumps(clip), seconds=seconds))
        except Rejected as rej:
            out.append(_result(source.clip_id, row["shard"], "quarantined", rej.stage, rej.reason, rej.detail))
        except Exception as exc:  # noqa: BLE001 - a bug or library crash on one clip must not stop the job
            detail = f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2).splitlines()[-1]}"
            out.append(_result(source.clip_id, row["shard"], "quarantined", "decode", "decode_error", detail))
    return _columns(out)


class EncodeStage:
    """Ray Data actor: holds the encoders; curated clips in, shard rows out (quarantined rows pass)."""

    def __init__(self, cfg_json: dict, threads: int = 1) -> None:
        import torch

        from livetalk_ray.data.encode import ClipEncoder

        torch.set_num_threads(threads)
        # A user error here (vae.path and the like) travels to the driver as a "failed" row, which ends the run
        # with that error: an actor dying in its constructor would only be seen as its traceback's text (and
        # Ray prints its readiness probe's failure), a failed batch would be dropped as worker_lost.
        self.init_error: Exception | None = None
        try:
            self.encoder = ClipEncoder(LiveTalkConfig.model_validate(cfg_json))
        except Exception as exc:
            if not is_user_error(exc):
                raise
            self.init_error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _rows(batch)
        if self.init_error is not None:
            failed = pickle.dumps(self.init_error)
            return _columns([_result(r["clip_id"], r["shard"], "failed", payload=failed) for r in rows])
        passed = [row for row in rows if row["status"] != "curated"]  # quarantined rows pass through
        curated = [row for row in rows if row["status"] == "curated"]
        results = self._encode_rows(curated) if curated else []
        if len(curated) > 1 and results[0]["status"] == "quarantined":  # the batch failed: find the culprit
            results = [self._encode_rows([row])[0] for row in curated]
        return _columns(passed + results)

    def _encode_rows(self, rows: list[dict]) -> list[dict]:
        start = time.perf_counter()
        try:
            clips = [pickle.loads(row["payload"]) for row in rows]
            encoded = self.encoder.encode(clips)
        except Exception as exc:  # noqa: BLE001 - an encoder failure quarantines its clips, never the job
            detail = f"{type(exc).__name__}: {exc}"
            return [_result(r["clip_id"], r["shard"], "quarantined", "encode", "encode_error", detail) for r in rows]
        seconds = (time.perf_counter() - start) / len(rows)
        return [self._accepted(r, c, e, seconds) for r, c, e in zip(rows, clips, encoded, strict=True)]

    @staticmethod
    def _accepted(row: dict, clip, encoded: dict, encode_seconds: float) -> dict:
        record = {
            "clip_id": clip.clip_id,
            "source": clip.source,
            "caption": clip.caption,
            "raw_caption": clip.raw_caption,
            "ref_source": clip.ref_source,
            "quality": json.dumps(clip.quality),
            "audio": clip.audio,
            "ref_image": clip.ref_image,
            **encoded,
        }
        seconds = {**json.loads(row["seconds"]), "encode": encode_seconds}
        return _result(row["clip_id"], row["shard"], "accepted", payload=pickle.dumps(record), seconds=seconds)


# ------------------------------------------------------------------------------------------ shards
class ShardAssembler:
    """Driver side: collects results per shard, writes each shard atomically when it is complete."""

    def __init__(self, out: Path, cfg: LiveTalkConfig, shards: list[list[ClipSource]]) -> None:
        self.out, self.cfg, self.shards = out, cfg, shards
        self.pending: dict[int, dict[str, dict]] = defaultdict(dict)
        for d in ("shards", "quarantine", "_done"):
            (out / d).mkdir(parents=True, exist_ok=True)

    def marker(self, k: int) -> Path:
        return self.out / "_done" / f"shard-{k:05d}.json"

    def is_done(self, k: int) -> bool:
        path = self.marker(k)
        if not path.is_file():
            return False
        done_ids = json.loads(path.read_text())["clip_ids"]
        if done_ids != [s.clip_id for s in self.shards[k]]:
            raise ConfigError(
                f"{self.out} was prepared from a different input (shard {k} differs): use a new --out directory"
            )
        return True

    def add(self, result: dict) -> None:
        k = int(result["shard"])
        self.pending[k][result["clip_id"]] = result
        if len(self.pending[k]) == len(self.shards[k]):
            self._write(k)

    def finish(self) -> None:
        """Clips that never came back (their task or actor died for good) are quarantined as lost."""
        for k in sorted(self.pending):
            for s in self.shards[k]:
                if s.clip_id not in self.pending[k]:
                    self.pending[k][s.clip_id] = _result(
                        s.clip_id,
                        k,
                        "quarantined",
                        "worker",
                        "worker_lost",
                        "no result came back from the Ray task or actor",
                    )
            self._write(k)

    def _write(self, k: int) -> None:
        results = self.pending.pop(k)
        accepted = [pickle.loads(r["payload"]) for r in results.values() if r["status"] == "accepted"]
        quarantined = [
            {
                "clip_id": r["clip_id"],
                "path": next(s.path for s in self.shards[k] if s.clip_id == r["clip_id"]),
                "stage": r["stage"],
                "reason": r["reason"],
                "detail": r["detail"],
            }
            for r in results.values()
            if r["status"] != "accepted"
        ]
        name = f"shard-{k:05d}.parquet"
        if accepted:
            write_parquet_atomic(
                rows_to_table(sorted(accepted, key=lambda r: r["clip_id"]), self.cfg), self.out / "shards" / name
            )
        write_parquet_atomic(
            pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA), self.out / "quarantine" / name
        )
        seconds: dict[str, float] = defaultdict(float)
        for r in results.values():
            for stage, v in json.loads(r["seconds"]).items():
                seconds[stage] += v
                metrics.record(metrics.DATA_STAGE_SECONDS, v, stage=stage)
        for q in quarantined:
            metrics.record(metrics.DATA_QUARANTINED, stage=q["stage"], reason=q["reason"])
        metrics.record(metrics.DATA_CLIPS, len(accepted), outcome="accepted")
        metrics.record(metrics.DATA_CLIPS, len(quarantined), outcome="quarantined")
        summary = {
            "clip_ids": [s.clip_id for s in self.shards[k]],
            "accepted": len(accepted),
            "quarantined": len(quarantined),
            "reasons": dict(Counter(q["reason"] for q in quarantined)),
            "stage_seconds": dict(seconds),
        }
        tmp = self.marker(k).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, self.marker(k))


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Readers (and resume checks) never see a half-written shard."""
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def plan_shards(sources: list[ClipSource], clips_per_shard: int) -> list[list[ClipSource]]:
    return [sources[i : i + clips_per_shard] for i in range(0, len(sources), clips_per_shard)]


def finalize(out: Path, shards: list[list[ClipSource]], wall_seconds: float) -> dict:
    """Merge the quarantine parts and write stats.json from the shard markers."""
    parts = [pq.read_table(out / "quarantine" / f"shard-{k:05d}.parquet") for k in range(len(shards))]
    pq.write_table(pa.concat_tables(parts) if parts else QUARANTINE_SCHEMA.empty_table(), out / "quarantine.parquet")
    summaries = [json.loads((out / "_done" / f"shard-{k:05d}.json").read_text()) for k in range(len(shards))]
    reasons: Counter[str] = Counter()
    stage_seconds: Counter[str] = Counter()
    for s in summaries:
        reasons.update(s["reasons"])
        stage_seconds.update(s["stage_seconds"])
    stats = {
        "clips_in": sum(len(s) for s in shards),
        "accepted": sum(s["accepted"] for s in summaries),
        "quarantined": sum(s["quarantined"] for s in summaries),
        "reasons": dict(sorted(reasons.items())),
        "shards": sum(1 for s in summaries if s["accepted"]),
        "stage_seconds": dict(stage_seconds),
        "wall_seconds_last_run": wall_seconds,
    }
    assert stats["clips_in"] == stats["accepted"] + stats["quarantined"], stats
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


# ------------------------------------------------------------------------------------------ drivers
def _items(shards: list[list[ClipSource]], todo: list[int]) -> list[dict]:
    return [{"clip_id": s.clip_id, "shard": k, "source": json.dumps(asdict(s))} for k in todo for s in shards[k]]


def run_with_ray(items: list[dict], cfg: LiveTalkConfig) -> Iterator[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one progress bar over clips
    ctx.max_errored_blocks = -1  # a block lost for good is accounted for as worker_lost, not a failed job
    cfg_json = cfg.model_dump(mode="json")
    blocks = max(1, -(-len(items) // cfg.data.decode_batch_clips))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # The memory request also keeps Ray from fusing decoding into the encoder actors, which would
    # serialise it behind them.
    ds = ds.map_batches(
        decode_stage,
        fn_kwargs={"cfg_json": cfg_json},
        batch_size=cfg.data.decode_batch_clips,
        num_cpus=cfg.data.decode_cpus,
        memory=cfg.data.decode_memory_mb * 2**20,
        max_retries=cfg.data.decode_max_retries,  # Ray Data retries a dying task forever by default
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={"cfg_json": cfg_json, "threads": max(1, round(cfg.data.encode_cpus))},
        batch_size=cfg.data.encode_batch_clips,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.encode_actors),
        num_cpus=cfg.data.encode_cpus,
        num_gpus=cfg.data.encode_gpus,
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        yield from _rows(batch)


def run_in_process(items: list[dict], cfg: LiveTalkConfig, threads: int = 1) -> Iterator[dict]:
    """The same stage functions in one process without Ray: clips decoded one after another and encoded in
    batches of `encode_batch_clips`, as the actor pool does (the benchmark's baseline)."""
    cfg_json = cfg.model_dump(mode="json")
    encoder = EncodeStage(cfg_json, threads=threads)
    size = cfg.data.encode_batch_clips
    for i in range(0, len(items), size):
        decoded = [
            decode_stage({k: np.array([v], dtype=object) for k, v in item.items()}, cfg_json)
            for item in items[i : i + size]
        ]
        batch = {c: np.concatenate([d[c] for d in decoded]) for c in RESULT_COLUMNS}
        yield from _rows(encoder(batch))


def prepare(
    cfg: LiveTalkConfig,
    input_path: str | Path,
    out: str | Path,
    *,
    local_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare shards through Ray Data (Ray must be initialised), or with `local_threads` set, in this
    process without Ray (torch using that many threads)."""
    out = Path(out)
    root, sources = discover(input_path)
    shards = plan_shards(sources, cfg.data.clips_per_shard)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    assembler = ShardAssembler(out, cfg, shards)
    todo = [k for k in range(len(shards)) if not assembler.is_done(k)]
    items = _items(shards, todo)
    start = time.perf_counter()  # wall time of the work done by this run (0 when everything was done)
    if items:
        results: Generator[dict] = (
            run_with_ray(items, cfg) if local_threads is None else run_in_process(items, cfg, local_threads)
        )
        bar = _progress(len(items), len(sources) - len(items), enabled=progress)
        # closing: a run that stops early ends Ray Data's iterator now, while Ray is still up.
        with contextlib.closing(results), bar as advance:
            for result in results:
                if result["status"] == "failed":
                    raise pickle.loads(result["payload"])  # the encoders could not start: nothing would succeed
                assembler.add(result)
                advance(result["status"])
        assembler.finish()
    return finalize(out, shards, time.perf_counter() - start if items else 0.0)


class _progress:
    """A rich progress bar over clips, showing accepted / quarantined counts."""

    def __init__(self, total: int, skipped: int, enabled: bool) -> None:
        self.total, self.skipped, self.enabled = total, skipped, enabled
        self.counts: Counter[str] = Counter()

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from livetalk_ray.progress import progress_bar

        self.bar = progress_bar(
            TextColumn("[bold]prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            disable=not self.enabled,
        )
        self.bar.__enter__()
        status = f"({self.skipped} clips in finished shards skipped)" if self.skipped else ""
        self.task = self.bar.add_task("clips", total=self.total, status=status)

        def advance(status: str) -> None:
            self.counts["accepted" if status == "accepted" else "quarantined"] += 1
            self.bar.update(
                self.task,
                advance=1,
                status=f"accepted {self.counts['accepted']} · quarantined {self.counts['quarantined']}",
            )

        return advance

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)
