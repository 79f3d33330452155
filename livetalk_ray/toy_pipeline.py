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

STAGES = ["clips", "vae", "tiny_decoder", "shards", "teacher", "trajectories", "ode", "dmd", "export", "eval"]


def _latest(run_dir: Path) -> str:
    from livetalk_ray.train.engine import latest_checkpoint

    return str(latest_checkpoint(run_dir))


def run_pipeline(cfg: LiveTalkConfig, out: str | Path, console: Console, progress: bool = True) -> dict:
    """Run every unfinished stage (Ray must be initialised); returns every stage's outputs."""
    out = Path(out).resolve()
    marks = out / "stages"
    marks.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    outputs: dict[str, dict] = {}

    def stage(name: str, work: Callable[[], dict]) -> dict:
        return _run_once(name, work, marks, outputs, console)

    stage("clips", lambda: _make_clips(cfg, out, progress))
    vae_path = stage("vae", lambda: _train_vae(cfg, out))["vae_path"]
    stage("tiny_decoder", lambda: _train_tiny_decoder(cfg, out, vae_path))
    base = _config_with(cfg, vae__path=vae_path, train__eval_data=str(out / "shards_eval"))
    stage("shards", lambda: _prepare_shards(base, out, progress))
    teacher_ckpt = stage("teacher", lambda: _train_teacher(cfg, out, vae_path))["checkpoint"]
    stage("trajectories", lambda: _generate_trajectories(cfg, out, teacher_ckpt, progress))
    ode_ckpt = stage("ode", lambda: _train_ode(cfg, out, vae_path, teacher_ckpt))["checkpoint"]
    stage("dmd", lambda: _train_dmd(cfg, out, vae_path, teacher_ckpt, ode_ckpt))
    student = stage("export", lambda: _export_student(out))["checkpoint"]
    stage("eval", lambda: _evaluate(base, out, console, teacher_ckpt, ode_ckpt, student))
    return outputs


def _run_once(name: str, work: Callable[[], dict], marks: Path, outputs: dict[str, dict], console: Console) -> dict:
    """Run a stage unless its mark says it is done; either way its outputs go into `outputs`."""
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


def _config_with(cfg: LiveTalkConfig, **updates) -> LiveTalkConfig:
    """A copy of the config with dotted-key updates (e.g. `vae__path=...`)."""
    copy = cfg.model_copy(deep=True)
    for dotted, value in updates.items():
        *parents, key = dotted.split("__")
        section = copy
        for part in parents:
            section = getattr(section, part)
        setattr(section, key, value)
    return copy


def _make_clips(cfg: LiveTalkConfig, out: Path, progress: bool) -> dict:
    from livetalk_ray.toyworld.clips import make_demo_dataset

    p, v = cfg.pipeline, cfg.video
    for name, count, seed in (("clips_train", p.train_clips, 1), ("clips_eval", p.heldout_clips, 2)):
        make_demo_dataset(out / name, count, seed, fps=v.fps, height=v.height, width=v.width, progress=progress)
    return {"train": str(out / "clips_train"), "eval": str(out / "clips_eval")}


def _train_vae(cfg: LiveTalkConfig, out: Path) -> dict:
    from livetalk_ray.train.vae import train_vae

    steps = cfg.pipeline.vae_train_steps
    vae_cfg = _config_with(cfg, train__max_steps=steps)  # the cosine LR schedule spans the stage
    result = train_vae(vae_cfg, out / "clips_train", out / "vae", steps, resume=True)
    return {"vae_path": result["vae_path"], **{k: v for k, v in result["history"][-1].items() if k != "step"}}


def _train_tiny_decoder(cfg: LiveTalkConfig, out: Path, vae_path: str) -> dict:
    from livetalk_ray.train.tiny_decoder import WEIGHTS, train_tiny_decoder

    steps = cfg.pipeline.tiny_decoder_train_steps
    tiny_cfg = _config_with(cfg, vae__path=vae_path, train__max_steps=steps)
    summary = train_tiny_decoder(tiny_cfg, out / "clips_train", out / "tiny_decoder", steps, resume=True)
    return {**summary, "path": str(Path(summary["checkpoint"]) / WEIGHTS)}


def _prepare_shards(base: LiveTalkConfig, out: Path, progress: bool) -> dict:
    from livetalk_ray.data.pipeline import prepare

    stats = {
        name: prepare(base, out / src, out / name, progress=progress)
        for name, src in (("shards", "clips_train"), ("shards_eval", "clips_eval"))
    }
    return {name: {"accepted": s["accepted"], "quarantined": s["quarantined"]} for name, s in stats.items()}


def _train_teacher(cfg: LiveTalkConfig, out: Path, vae_path: str) -> dict:
    from livetalk_ray.train.launch import run_stage

    steps = cfg.pipeline.teacher_train_steps
    teacher_cfg = _config_with(
        cfg, vae__path=vae_path, train__eval_data=str(out / "shards_eval"), train__max_steps=steps
    )
    summary = run_stage("teacher", teacher_cfg, out / "shards", out / "teacher", steps, resume=True)
    return {"checkpoint": _latest(out / "teacher"), "lipsync": summary.get("lipsync_mean")}


def _generate_trajectories(cfg: LiveTalkConfig, out: Path, teacher_ckpt: str, progress: bool) -> dict:
    from livetalk_ray.train.ode import generate_trajectories

    traj_cfg = _config_with(cfg, train__ode__teacher_checkpoint=teacher_ckpt)
    return generate_trajectories(traj_cfg, out / "shards", out / "traj", progress=progress)


def _train_ode(cfg: LiveTalkConfig, out: Path, vae_path: str, teacher_ckpt: str) -> dict:
    from livetalk_ray.train.launch import run_stage

    p = cfg.pipeline
    ode_cfg = _config_with(
        cfg,
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


def _train_dmd(cfg: LiveTalkConfig, out: Path, vae_path: str, teacher_ckpt: str, ode_ckpt: str) -> dict:
    from livetalk_ray.train.dmd.controller import run_dmd

    steps = cfg.pipeline.dmd_train_steps
    dmd_cfg = _config_with(
        cfg,
        vae__path=vae_path,
        train__dmd__generator_checkpoint=ode_ckpt,
        train__dmd__teacher_checkpoint=teacher_ckpt,
        train__max_steps=steps,
    )
    return run_dmd(dmd_cfg, out / "shards", out / "dmd", steps, resume=True)


def _export_student(out: Path) -> dict:
    from livetalk_ray.train.dmd.export import export_generator

    directory, used_ema = export_generator(out / "dmd", out / "student")
    return {"checkpoint": str(directory), "ema": used_ema}


def _evaluate(
    base: LiveTalkConfig, out: Path, console: Console, teacher_ckpt: str, ode_ckpt: str, student: str
) -> dict:
    from livetalk_ray.eval.longform import evaluate_long, portrait_talks, rows_for
    from livetalk_ray.eval.table import Candidate, evaluate, write_report

    p = base.pipeline
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
