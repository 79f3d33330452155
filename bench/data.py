"""Data pipeline benchmark: Ray Data vs the same stage functions in one process, same clips, same run.

    .venv/bin/python bench/data.py [--clips 48] [--out bench/results/data.json]

Renders toy-world clips (not timed), prepares them once with `prepare(..., use_ray=False)` (decode,
curate and encode one clip after another in this process, torch using every core) and once through Ray
Data on a local 2-CPU Ray (decode tasks in parallel with an encoder actor pool), and reports clips/s,
the speed-up and the time per stage. Ray's start-up is reported separately, not counted in clips/s.
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

from livetalk_ray.config import load_config
from livetalk_ray.data.pipeline import prepare
from livetalk_ray.toyworld.clips import make_demo_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--encode-actors", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/data.json"))
    args = parser.parse_args()
    console = Console(width=120)
    cpus = os.cpu_count() or 2
    cfg = load_config(
        "toy",
        overrides=[
            f"data.encode_actors={args.encode_actors}",
            f"data.encode_cpus={cpus / (2 * args.encode_actors)}",
            f"data.decode_cpus={cpus / 4}",
            "data.decode_memory_mb=256",
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

    start = time.perf_counter()
    local = prepare(cfg, work / "clips", work / "local", use_ray=False, progress=False)
    local_s = time.perf_counter() - start

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - start
    start = time.perf_counter()
    distributed = prepare(cfg, work / "clips", work / "ray", progress=False)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    assert local["accepted"] == distributed["accepted"], (local, distributed)

    result = {
        "clips": args.clips,
        "cpus": cpus,
        "encode_actors": args.encode_actors,
        "accepted": local["accepted"],
        "single_process": {
            "seconds": local_s,
            "clips_per_s": args.clips / local_s,
            "stage_seconds": local["stage_seconds"],
        },
        "ray_data": {
            "seconds": ray_s,
            "clips_per_s": args.clips / ray_s,
            "ray_init_s": ray_init_s,
            "stage_seconds": distributed["stage_seconds"],
        },
        "speedup": local_s / ray_s,
    }
    table = Table(title=f"{args.clips} toy clips, {cpus} CPUs")
    for col in ("pipeline", "wall s", "clips/s", "decode+curate s/clip", "encode s/clip"):
        table.add_column(col, justify="right")
    for name, key in (("single process", "single_process"), ("Ray Data", "ray_data")):
        r = result[key]
        table.add_row(
            name,
            f"{r['seconds']:.1f}",
            f"{r['clips_per_s']:.2f}",
            f"{r['stage_seconds'].get('decode_curate', 0) / args.clips:.3f}",
            f"{r['stage_seconds'].get('encode', 0) / args.clips:.3f}",
        )
    console.print(table)
    console.print(f"speed-up {result['speedup']:.2f}x (goal 1.7x); ray.init {ray_init_s:.1f} s not counted")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
