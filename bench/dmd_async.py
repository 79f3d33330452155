"""DMD controller benchmark: synchronous (staleness 0) vs asynchronous rollouts, same config, same run.

    .venv/bin/python bench/dmd_async.py [--steps 60] [--staleness 1] [--out bench/results/dmd_async.json]

Toy-preset networks (random weights: the speed does not depend on them) on schema-valid random shards,
4 role actors sharing the machine's CPUs (generator, critic, teacher, one rollout worker), the 5:1
schedule after a short warm-up. Iterations/s is taken between the first and the last logged iteration
(actor start-up excluded); idle ratios are 1 − busy/up time per role, from the roles' own counters.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from livetalk_ray.config import load_config
from livetalk_ray.data.synthetic import write_random_shards
from livetalk_ray.models.checkpoint import save_checkpoint
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.dmd.controller import Controller


def measure(cfg, shards: Path, run_dir: Path, steps: int) -> dict:
    start = time.perf_counter()
    Controller(cfg, shards, run_dir, steps).run()
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # completion rate between the first and the last critic step (the first also waited for start-up)
    rate = (len(records) - 1) / (records[-1]["done_s"] - records[0]["done_s"])
    last = records[-1]
    idle = {role: 1 - busy / last["roles_up_s"] for role, busy in last["busy_s"].items()}
    return {
        "iterations_per_s": rate,
        "wall_s": wall,
        "idle_ratio": idle,
        "max_staleness": max(r["staleness"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dmd_async.json"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="livetalk-bench-dmd-"))
    base = load_config("toy")
    shards = write_random_shards(base, work / "shards", shards=4, clips=8)
    torch.manual_seed(0)
    teacher = save_checkpoint(WanDiT(base.model, causal=False), base, work / "teacher")
    student = save_checkpoint(WanDiT(base.model), base, work / "student")
    cpus = (os.cpu_count() or 2) / 4
    common = [
        f"train.dmd.teacher_checkpoint={teacher}",
        f"train.dmd.generator_checkpoint={student}",
        f"train.engine.micro_batch_per_worker={args.batch}",
        "train.dmd.critic_warmup=5",
        f"train.checkpoint_every={args.steps}",
        *[f"train.dmd.placement.{role}.cpus={cpus}" for role in ("generator", "critic", "teacher", "rollout")],
    ]
    results = {}
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for label, staleness in (("synchronous", 0), ("async", args.staleness)):
            cfg = load_config("toy", overrides=[*common, f"train.dmd.staleness={staleness}"])
            results[label] = {"staleness": staleness, **measure(cfg, shards, work / label, args.steps)}
    finally:
        ray.shutdown()
    speedup = results["async"]["iterations_per_s"] / results["synchronous"]["iterations_per_s"]
    table = Table(title=f"DMD controller, toy preset, {args.steps} iterations, batch {args.batch}")
    for col in ("mode", "staleness", "it/s", "max staleness", "idle: generator", "critic", "teacher", "rollout"):
        table.add_column(col)
    for label, r in results.items():
        idle = r["idle_ratio"]
        table.add_row(
            label,
            str(r["staleness"]),
            f"{r['iterations_per_s']:.2f}",
            str(r["max_staleness"]),
            *[f"{idle[k]:.0%}" for k in ("generator", "critic", "teacher", "rollout")],
        )
    console.print(table)
    console.print(f"async ÷ synchronous = {speedup:.2f}x (goal ≥ 1.3x with staleness ≤ 1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "speedup": speedup, **results}, indent=2)
    )
    console.print(f"→ {args.out}")


if __name__ == "__main__":
    main()
