"""Training benchmark: teacher and ODE-regression samples/s on Ray Train with 1 vs 2 workers, in one run,
and the time a toy teacher run took to reach the quality bar.

    .venv/bin/python bench/train.py [--steps 40] [--quality-run RUN_DIR] [--out bench/results/train.json]

Throughput: toy-preset model and shapes on schema-valid shards of random tensors (the speed does not
depend on the values), DeepSpeed ZeRO-2 over gloo, `micro_batch_per_worker` clips per worker per step, one
CPU per worker. samples/s is the median over the steps after the first five (start-up excluded) from the
run's own metrics.jsonl. The ODE runs read trajectories made once by a random teacher (not timed).

Quality (`--quality-run`, a finished `livetalk train teacher` run with `--eval-data`): every checkpoint's
held-out lip-sync (fixed conditions and noise), against an untrained teacher and the ground truth through
the same VAE, and the optimizer time until `--bar` was first reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.data.synthetic import write_random_shards
from livetalk_ray.models.checkpoint import save_checkpoint
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.launch import run_stage
from livetalk_ray.train.ode import generate_trajectories


def samples_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records[5:])


def _beside(path: str | None, parent: Path) -> str | None:
    """`path` relative to `parent` when inside it, else its last three parts."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    if resolved.is_relative_to(parent.resolve()):
        return str(resolved.relative_to(parent.resolve()))
    return str(Path(*resolved.parts[-3:]))


def score_run(run_dir: Path, bar: float, vae: str | None) -> dict:
    """Held-out lip-sync of every checkpoint of a teacher run (same conditions, same noise), decoded with
    `vae` (default: the run's own), plus the floor (an untrained teacher) and the ceiling (the ground-truth
    latents through the same VAE); the optimizer seconds until the bar was first reached."""
    import numpy as np
    import torch

    from livetalk_ray.data.reader import first_batch
    from livetalk_ray.diffusion.clips import EVAL_COLUMNS, SAMPLE_SEED, sample_clips
    from livetalk_ray.models.checkpoint import load_checkpoint
    from livetalk_ray.models.vae import WanVAE
    from livetalk_ray.toyworld.measure import lip_sync_scores
    from livetalk_ray.train.loop import load_stage

    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    cfg = load_config(config_file=steps[-1] / "config.yaml", overrides=[f"vae.path={vae}"] if vae else None)
    batch = first_batch(cfg.train.eval_data, cfg, EVAL_COLUMNS, cfg.train.report_clips)
    decoder = WanVAE(cfg.vae)
    audio, fps = batch["audio"].numpy(), cfg.video.fps

    def lipsync(model) -> float:
        frames = decoder.decode_frames(sample_clips(model.eval(), cfg, batch, SAMPLE_SEED))
        return float(np.mean(lip_sync_scores(frames, audio, fps)))

    torch.manual_seed(cfg.runtime.seed)
    floor = lipsync(load_stage("teacher").build_model(cfg, "cpu", torch.float32))
    ceiling = float(np.mean(lip_sync_scores(decoder.decode_frames(batch["latents"]), audio, fps)))
    train_s = {r["step"]: r["train_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    history = []
    for directory in steps:
        step = int(directory.name.split("_")[1])
        history.append(
            {
                "step": step,
                "lipsync": lipsync(load_checkpoint(directory, causal=False)[0]),
                "train_s": train_s.get(step),
            }
        )
    first = next((h for h in history if h["lipsync"] >= bar), None)
    best = max(history, key=lambda h: h["lipsync"])
    return {
        # relative to the run's parent directory: results carry no machine paths
        "run": Path(run_dir).name,
        "vae": _beside(cfg.vae.path, Path(run_dir).parent),
        "eval_clips": len(audio),
        "bar": bar,
        "untrained_teacher": floor,
        "vae_reconstruction": ceiling,
        "reached_at_step": first["step"] if first else None,
        "train_seconds_to_bar": first["train_s"] if first else None,
        "best": best,
        "history": history,
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    console = Console(width=120)
    work = Path(tempfile.mkdtemp(prefix="livetalk-bench-train-"))
    overrides = [
        f"train.engine.micro_batch_per_worker={args.batch}",
        f"train.checkpoint_every={args.steps}",
        "train.cpus_per_worker=1",
        "train.report_clips=1",
        "sampler.teacher_steps=8",  # the end-of-run sample report only; training cost is unaffected
    ]
    cfg = load_config("toy", overrides=overrides)
    shards = write_random_shards(cfg, work / "shards", shards=8, clips=8)
    teacher_dir = save_checkpoint(WanDiT(cfg.model, causal=False), cfg, work / "teacher0")
    ode_cfg = cfg.model_copy(deep=True)
    ode_cfg.train.ode.teacher_checkpoint = str(teacher_dir)
    generate_trajectories(ode_cfg, shards, work / "traj", use_ray=False, progress=False)

    runs = (("teacher", cfg, shards), ("ode", ode_cfg, work / "traj"))
    rows = measure_throughput(runs, work, args.steps)
    speedups = print_throughput(rows, args.batch, args.steps, console)
    result = {
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "batch_per_worker": args.batch,
        "rows": rows,
        "speedup_2_over_1": speedups,
    }
    if args.quality_run:
        quality = score_run(args.quality_run, args.bar, args.vae)
        result["teacher_quality"] = quality
        print_quality(quality, args.bar, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"→ {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="clips per worker per step")
    parser.add_argument("--quality-run", type=Path, default=None)
    parser.add_argument("--bar", type=float, default=0.5, help="held-out lip-sync the teacher must reach")
    parser.add_argument("--vae", default=None, help="decode with this VAE instead of the run's")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    return parser.parse_args()


def measure_throughput(runs: tuple[tuple[str, LiveTalkConfig, Path], ...], work: Path, steps: int) -> list[dict]:
    """Train every (stage, config, data) for `steps` steps on a local Ray with 1 and then 2 workers."""
    import ray

    rows = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for stage, stage_cfg, data in runs:
            for workers in (1, 2):
                run_cfg = stage_cfg.model_copy(deep=True)
                run_cfg.train.workers = workers
                start = time.perf_counter()
                run_stage(stage, run_cfg, data, work / f"{stage}-{workers}", steps)
                rate = samples_per_s(work / f"{stage}-{workers}")
                rows.append(
                    {"stage": stage, "workers": workers, "samples_per_s": rate, "wall_s": time.perf_counter() - start}
                )
    finally:
        ray.shutdown()
    return rows


def print_throughput(rows: list[dict], batch: int, steps: int, console: Console) -> dict[str, float]:
    """Print the throughput table and each stage's 2-worker speed-up; returns the speed-ups."""
    speedups = {
        stage: next(r["samples_per_s"] for r in rows if r["stage"] == stage and r["workers"] == 2)
        / next(r["samples_per_s"] for r in rows if r["stage"] == stage and r["workers"] == 1)
        for stage in ("teacher", "ode")
    }
    table = Table(title=f"Ray Train throughput, toy preset, {batch} clips/worker/step, {steps} steps")
    for col in ("stage", "workers", "samples/s (median)", "wall s (incl. start-up)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["stage"], str(r["workers"]), f"{r['samples_per_s']:.1f}", f"{r['wall_s']:.0f}")
    console.print(table)
    for stage, x in speedups.items():
        console.print(f"{stage}: 2 workers ÷ 1 worker = {x:.2f}x")
    return speedups


def print_quality(quality: dict, bar: float, console: Console) -> None:
    console.print(
        f"held-out lip-sync ({quality['eval_clips']} clips): "
        f"best teacher checkpoint {quality['best']['lipsync']:.3f} "
        f"(step {quality['best']['step']}), untrained {quality['untrained_teacher']:.3f}, "
        f"ground truth through the VAE {quality['vae_reconstruction']:.3f}"
    )
    reached = quality["train_seconds_to_bar"]
    console.print(
        f"quality bar {bar}: "
        + (
            f"reached at step {quality['reached_at_step']} after {reached:.0f} s of optimizer time"
            if reached
            else "not reached"
        )
    )


if __name__ == "__main__":
    main()
