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

    local = {}
    for threads in (1, cpus):  # a plain serial loop, and the same loop with torch using every core
        start = time.perf_counter()
        stats = prepare(cfg, work / "clips", work / f"local{threads}", local_threads=threads, progress=False)
        local[threads] = (time.perf_counter() - start, stats)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_init_s = time.perf_counter() - start
    start = time.perf_counter()
    distributed = prepare(cfg, work / "clips", work / "ray", progress=False)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    assert all(stats["accepted"] == distributed["accepted"] for _, stats in local.values())

    def entry(seconds: float, stats: dict) -> dict:
        return {"seconds": seconds, "clips_per_s": args.clips / seconds, "stage_seconds": stats["stage_seconds"]}

    result = {
        "clips": args.clips,
        "cpus": cpus,
        "encode_actors": args.encode_actors,
        "accepted": distributed["accepted"],
        "single_process_1_thread": entry(*local[1]),
        f"single_process_{cpus}_threads": entry(*local[cpus]),
        "ray_data": {**entry(ray_s, distributed), "ray_init_s": ray_init_s},
        "speedup_vs_serial_loop": local[1][0] / ray_s,
        f"speedup_vs_{cpus}_thread_loop": local[cpus][0] / ray_s,
    }
    table = Table(title=f"{args.clips} toy clips, {cpus} CPUs")
    for col in ("pipeline", "wall s", "clips/s", "decode+curate s/clip", "encode s/clip"):
        table.add_column(col, justify="right")
    rows = (
        ("one process, 1 thread", "single_process_1_thread"),
        (f"one process, {cpus} threads", f"single_process_{cpus}_threads"),
        ("Ray Data", "ray_data"),
    )
    for name, key in rows:
        r = result[key]
        table.add_row(
            name,
            f"{r['seconds']:.1f}",
            f"{r['clips_per_s']:.2f}",
            f"{r['stage_seconds'].get('decode_curate', 0) / args.clips:.3f}",
            f"{r['stage_seconds'].get('encode', 0) / args.clips:.3f}",
        )
    console.print(table)
    console.print(
        f"Ray Data speed-up: {result['speedup_vs_serial_loop']:.2f}x over the serial loop (goal 1.7x), "
        f"{result[f'speedup_vs_{cpus}_thread_loop']:.2f}x over the {cpus}-thread loop; "
        f"ray.init {ray_init_s:.1f} s not counted"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
