"""Data pipeline benchmark: Ray Data vs the same stage functions in one process, same clips, same run.

    .venv/bin/python bench/data.py [--clips 48] [--out bench/results/data.json]

Renders toy-world clips (not timed), prepares them without Ray (`prepare(..., local_threads=N)`: decode,
curate and encode one clip after another in this process) with torch on 1 thread and on every core, and
once through Ray Data on a local Ray (decode tasks in parallel with an encoder actor pool), and reports
clips/s, the speed-ups and the time per stage. Ray's start-up is reported separately, not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.data.pipeline import prepare
from livetalk_ray.toyworld.clips import make_demo_dataset


def steady_clips_per_s(out: Path) -> float:
    """Throughput between the first and the last finished shard: start-up (worker and actor launch, model
    builds) excluded, which is what a long job sees."""
    markers = sorted((out / "_done").glob("*.json"), key=lambda p: p.stat().st_mtime)
    clips = sum(len(json.loads(m.read_text())["clip_ids"]) for m in markers[1:])
    return clips / (markers[-1].stat().st_mtime - markers[0].stat().st_mtime)


def main() -> None:
    args = parse_args()
    console = Console(width=120)
    cpus = os.cpu_count() or 2
    cfg = load_config(
        "toy",
        overrides=[
            f"data.encode_actors={args.encode_actors}",
            f"data.encode_cpus={cpus / (2 * args.encode_actors)}",
            f"data.decode_cpus={cpus / 4}",
            f"data.decode_batch_clips={args.decode_batch}",
            "data.decode_memory_mb=400",
        ],
    )
    work = Path(tempfile.mkdtemp(prefix="livetalk-bench-data-"))
    make_demo_dataset(
        work / "clips",
        args.clips,
        seed=123,
        fps=cfg.video.fps,
        height=cfg.video.height,
        width=cfg.video.width,
        sample_rate=cfg.audio.sample_rate,
    )

    runs = {}  # name → (wall seconds, stats, output directory)
    for threads in (1, cpus):  # a plain serial loop, and the same loop with torch using every core
        out = work / f"local{threads}"
        start = time.perf_counter()
        stats = prepare(cfg, work / "clips", out, local_threads=threads, progress=False)
        runs[f"one process, {threads} thread{'s' if threads > 1 else ''}"] = (time.perf_counter() - start, stats, out)
    ray_init_s, runs["Ray Data"] = run_on_ray(cfg, work, cpus)
    assert len({s["accepted"] for _, s, _ in runs.values()}) == 1

    result = report(runs, args.clips, cpus, args.encode_actors, ray_init_s, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--encode-actors", type=int, default=2)
    parser.add_argument("--decode-batch", type=int, default=1, help="clips per decode task")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data.json"))
    return parser.parse_args()


def run_on_ray(cfg: LiveTalkConfig, work: Path, cpus: int) -> tuple[float, tuple[float, dict, Path]]:
    """Prepare the clips through Ray Data on a local Ray: (ray.init seconds, (wall seconds, stats, output))."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - start
    start = time.perf_counter()
    stats = prepare(cfg, work / "clips", work / "ray", progress=False)
    run = (time.perf_counter() - start, stats, work / "ray")
    ray.shutdown()
    return ray_init_s, run


def report(
    runs: dict[str, tuple[float, dict, Path]],
    clips: int,
    cpus: int,
    encode_actors: int,
    ray_init_s: float,
    console: Console,
) -> dict:
    """Print the table and the speed-ups of Ray Data over each one-process run; returns them as the result."""
    result = {
        "clips": clips,
        "cpus": cpus,
        "encode_actors": encode_actors,
        "ray_init_s": ray_init_s,
        "accepted": runs["Ray Data"][1]["accepted"],
        "runs": {},
    }
    table = Table(title=f"{clips} toy clips, {cpus} CPUs")
    for col in ("pipeline", "wall s", "clips/s", "steady clips/s", "decode+curate s/clip", "encode s/clip"):
        table.add_column(col, justify="right")
    for name, (seconds, s, out) in runs.items():
        entry = {
            "seconds": seconds,
            "clips_per_s": clips / seconds,
            "steady_clips_per_s": steady_clips_per_s(out),
            "stage_seconds": s["stage_seconds"],
        }
        result["runs"][name] = entry
        table.add_row(
            name,
            f"{seconds:.1f}",
            f"{entry['clips_per_s']:.2f}",
            f"{entry['steady_clips_per_s']:.2f}",
            f"{s['stage_seconds'].get('decode_curate', 0) / clips:.3f}",
            f"{s['stage_seconds'].get('encode', 0) / clips:.3f}",
        )
    console.print(table)
    ray_run = result["runs"]["Ray Data"]
    for name, entry in result["runs"].items():
        if name != "Ray Data":
            result[f"speedup_over[{name}]"] = entry["seconds"] / ray_run["seconds"]
            result[f"steady_speedup_over[{name}]"] = ray_run["steady_clips_per_s"] / entry["steady_clips_per_s"]
            console.print(
                f"Ray Data vs {name}: {result[f'speedup_over[{name}]']:.2f}x end to end, "
                f"{result[f'steady_speedup_over[{name}]']:.2f}x in steady state (goal 1.7x)"
            )
    console.print(f"ray.init took {ray_init_s:.1f} s (not counted)")
    return result


if __name__ == "__main__":
    main()
