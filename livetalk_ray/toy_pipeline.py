"""`livetalk pipeline`: the whole toy chain in one resumable command.

    clips → vae → shards → teacher → trajectories → ode → dmd → export → eval

Each stage writes `OUT/stages/<name>.json` when it is done and is skipped on a rerun; a stage interrupted
half-way continues from its own checkpoints (every stage below is resumable on its own). Step counts and
sizes are `pipeline.*` in the config; the trained networks use the rest of the config as usual.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from livetalk_ray.config import LiveTalkConfig

STAGES = ["clips", "vae", "shards", "teacher", "trajectories", "ode", "dmd", "export", "eval"]


def _latest(run_dir: Path) -> str:
    from livetalk_ray.train.engine import latest_checkpoint

    return str(latest_checkpoint(run_dir))


def run_pipeline(cfg: LiveTalkConfig, out: str | Path, console: Console, progress: bool = True) -> dict:
    """Run every unfinished stage (Ray must be initialised); returns every stage's outputs."""
    out = Path(out).resolve()
    marks = out / "stages"
    marks.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    p = cfg.pipeline
    outputs: dict[str, dict] = {}

    def stage(name: str, work: Callable[[], dict]) -> dict:
        mark = marks / f"{name}.json"
        if mark.exists():
            outputs[name] = json.loads(mark.read_text())
            console.print(f"[dim]{name}: done earlier[/]", highlight=False)
            return outputs[name]
        console.print(f"[bold]{name}[/] …", highlight=False)
        start = time.perf_counter()
        result = {**work(), "seconds": time.perf_counter() - start}
        mark.write_text(json.dumps(result, indent=2))
        outputs[name] = result
        return result

    def with_(**updates) -> LiveTalkConfig:
        """A copy of the config with dotted-key updates (e.g. `vae__path=...`)."""
        copy = cfg.model_copy(deep=True)
        for dotted, value in updates.items():
            *parents, key = dotted.split("__")
            section = copy
            for part in parents:
                section = getattr(section, part)
            setattr(section, key, value)
        return copy

    def clips() -> dict:
        from livetalk_ray.toyworld.clips import make_demo_dataset

        v = cfg.video
        for name, count, seed in (("clips_train", p.train_clips, 1), ("clips_eval", p.heldout_clips, 2)):
            make_demo_dataset(out / name, count, seed, fps=v.fps, height=v.height, width=v.width, progress=progress)
        return {"train": str(out / "clips_train"), "eval": str(out / "clips_eval")}

    def vae() -> dict:
        from livetalk_ray.train.vae import train_vae

        vae_cfg = with_(train__max_steps=p.vae_train_steps)  # the cosine LR schedule spans the stage
        result = train_vae(vae_cfg, out / "clips_train", out / "vae", p.vae_train_steps, resume=True)
        return {"vae_path": result["vae_path"], **{k: v for k, v in result["history"][-1].items() if k != "step"}}

    stage("clips", clips)
    vae_path = stage("vae", vae)["vae_path"]
    base = with_(vae__path=vae_path, train__eval_data=str(out / "shards_eval"))

    def shards() -> dict:
        from livetalk_ray.data.pipeline import prepare

        stats = {
            name: prepare(base, out / src, out / name, progress=progress)
            for name, src in (("shards", "clips_train"), ("shards_eval", "clips_eval"))
        }
        return {name: {"accepted": s["accepted"], "quarantined": s["quarantined"]} for name, s in stats.items()}

    def teacher() -> dict:
        from livetalk_ray.train.launch import run_stage

        teacher_cfg = with_(
            vae__path=vae_path, train__eval_data=str(out / "shards_eval"), train__max_steps=p.teacher_train_steps
        )
        summary = run_stage("teacher", teacher_cfg, out / "shards", out / "teacher", p.teacher_train_steps, resume=True)
        return {"checkpoint": _latest(out / "teacher"), "lipsync": summary.get("lipsync_mean")}

    stage("shards", shards)
    teacher_ckpt = stage("teacher", teacher)["checkpoint"]

    def trajectories() -> dict:
        from livetalk_ray.train.ode import generate_trajectories

        return generate_trajectories(
            with_(train__ode__teacher_checkpoint=teacher_ckpt), out / "shards", out / "traj", progress=progress
        )

    def ode() -> dict:
        from livetalk_ray.train.launch import run_stage

        ode_cfg = with_(
            vae__path=vae_path,
            train__eval_data=str(out / "shards_eval"),
            train__ode__teacher_checkpoint=teacher_ckpt,
            train__optim__lr=p.ode_lr,
            train__plateau__stop=True,
            train__max_steps=p.ode_train_steps,
        )
        summary = run_stage("ode", ode_cfg, out / "traj", out / "ode", p.ode_train_steps, resume=True)
        return {
            "checkpoint": _latest(out / "ode"),
            "lipsync": summary.get("lipsync_mean"),
            "converged_at": summary.get("converged_at"),
        }

    stage("trajectories", trajectories)
    ode_ckpt = stage("ode", ode)["checkpoint"]

    def dmd() -> dict:
        from livetalk_ray.train.dmd.controller import run_dmd

        dmd_cfg = with_(
            vae__path=vae_path,
            train__dmd__generator_checkpoint=ode_ckpt,
            train__dmd__teacher_checkpoint=teacher_ckpt,
            train__max_steps=p.dmd_train_steps,
        )
        return run_dmd(dmd_cfg, out / "shards", out / "dmd", p.dmd_train_steps, resume=True)

    def export() -> dict:
        from livetalk_ray.train.dmd.export import export_generator

        directory, used_ema = export_generator(out / "dmd", out / "student")
        return {"checkpoint": str(directory), "ema": used_ema}

    stage("dmd", dmd)
    student = stage("export", export)["checkpoint"]

    def evaluate() -> dict:
        from livetalk_ray.eval.longform import evaluate_long, portrait_talks, rows_for
        from livetalk_ray.eval.table import Candidate, evaluate, write_report

        (out / "eval").mkdir(exist_ok=True)
        candidates = [
            Candidate("teacher", Path(teacher_ckpt), False),
            Candidate("ode", Path(ode_ckpt), True),
            Candidate("dmd", Path(student), True),
        ]
        # Clips: lip-sync and Fréchet distance on held-out training-length clips, and speed; long streams:
        # identity and lip-sync second by second of held-out portraits, with and without sinks.
        rows = evaluate(base, candidates, out / "shards_eval", seconds=10.0, out_dir=out / "eval", drift=False)
        talks = portrait_talks(base, p.eval_seconds, p.eval_people)
        long = evaluate_long(
            base, rows_for(Path(teacher_ckpt), Path(ode_ckpt), Path(student)), talks, p.eval_seconds, out / "eval"
        )
        _, table = write_report(long, rows, out / "eval")
        console.print(table.rstrip("\n"), highlight=False)
        return {"rows": rows, "long": {k: long[k] for k in ("seconds", "people", "rows")}}

    stage("eval", evaluate)
    return outputs
