"""`livetalk train ...` and `livetalk ode ...`: the resumable training stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from livetalk_ray.cli.common import (
    AddressOpt,
    ConfigOpt,
    PresetOpt,
    SetOpt,
    console,
    friendly_errors,
    ray_session,
    resolve_config,
)
from livetalk_ray.config import ConfigError

train_app = typer.Typer(no_args_is_help=True, help="Training stages (resumable, checkpoints under RUN_DIR).")


def step_progress(label: str, fields: str, out=None, every_s: float = 30.0):
    """The progress bar every training command shows: label, bar, steps done/total, `fields`, time left (a
    line every `every_s` seconds off a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from livetalk_ray.progress import progress_bar

    columns = [TextColumn(f"[bold]{label}"), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn(fields)]
    return progress_bar(*columns, TimeRemainingColumn(), console=out or console, every_s=every_s)


MaxStepsOpt = Annotated[
    int | None,
    typer.Option("--max-steps", min=0, help="stop after this step (default train.max_steps, the LR schedule's span)"),
]


@train_app.command("vae")
@friendly_errors
def train_vae_command(
    data: Annotated[Path, typer.Option("--data", help="directory of toy-world clips")],
    out: Annotated[Path, typer.Option("--out", help="run directory (checkpoints/step_NNNNNN/vae)")],
    max_steps: MaxStepsOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit the toy preset's VAE on toy-world clips and report PSNR (real presets use the Wan VAE)."""
    from livetalk_ray.train.vae import train_vae

    cfg = resolve_config(preset, config, set_)
    if cfg.preset != "toy":
        raise ConfigError("train vae fits the toy VAE only; real presets load the pretrained Wan VAE (vae.path)")
    stop = cfg.train.max_steps if max_steps is None else max_steps
    with step_progress("vae", "loss {task.fields[loss]}") as bar:
        task = bar.add_task("steps", total=stop, loss="-")
        result = train_vae(
            cfg,
            data,
            out,
            stop,
            resume,
            on_step=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4f}"),
        )
    last = result["history"][-1]
    console.print(
        f"step {last['step']}: held-out PSNR {last['psnr_db']:.2f} dB → use --set vae.path={result['vae_path']}",
        highlight=False,
    )


ode_app = typer.Typer(no_args_is_help=True, help="Teacher ODE trajectories for the student's initialisation.")

DataOpt = Annotated[Path, typer.Option("--data", help="prepared shards (`livetalk data prepare`)")]
OutOpt = Annotated[Path, typer.Option("--out", help="run directory (checkpoints/step_NNNNNN/)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in --out")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="Ray Train workers (default train.workers)")]
EvalOpt = Annotated[Path | None, typer.Option("--eval-data", help="held-out shards for the sample report")]
TeacherOpt = Annotated[
    Path | None, typer.Option("--teacher", help="teacher checkpoint directory (default train.ode.teacher_checkpoint)")
]


def _run_training(stage: str, cfg, data: Path, out: Path, max_steps: int | None, resume: bool, address) -> None:
    from livetalk_ray.train.launch import StageInterrupted, preflight, run_stage

    preflight(stage, cfg, data.resolve(), out.resolve(), resume)  # user errors before any progress output
    stop = cfg.train.max_steps if max_steps is None else max_steps
    fields = "loss {task.fields[loss]} · {task.fields[rate]} samples/s"
    with ray_session(address), step_progress(stage, fields) as bar:
        task = bar.add_task("steps", total=stop, loss="-", rate="-")

        def show(record: dict) -> None:
            rate = f"{record['samples_per_s']:.1f}"
            bar.update(task, completed=record["step"], loss=f"{record['loss']:.4f}", rate=rate)

        try:
            summary = run_stage(stage, cfg, data, out, stop, resume=resume, on_progress=show)
        except StageInterrupted as exc:
            bar.stop()
            console.print(f"[yellow]{exc}[/]", highlight=False)
            raise typer.Exit(130) from None
    line = f"{stage}: step {summary['step']} → {summary['checkpoint']}"
    if "lipsync_mean" in summary:
        line += f" · sample lip-sync {summary['lipsync_mean']:.3f}"
    if summary.get("converged_at"):
        line += f" · loss plateaued at step {summary['converged_at']}"
    console.print(line, highlight=False)


def _apply(cfg, workers: int | None, eval_data: Path | None) -> None:
    if workers is not None:
        cfg.train.workers = workers
    if eval_data is not None:
        cfg.train.eval_data = str(eval_data)


def _teacher(cfg, teacher: Path | None) -> None:
    if teacher is not None:
        cfg.train.ode.teacher_checkpoint = str(teacher)
    if not cfg.train.ode.teacher_checkpoint:
        raise ConfigError("pass --teacher DIR (a teacher checkpoint) or set train.ode.teacher_checkpoint")


@train_app.command("teacher")
@friendly_errors
def train_teacher(
    data: DataOpt,
    out: OutOpt,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    init: Annotated[Path | None, typer.Option("--init", help="starting weights (merged OmniAvatar)")] = None,
    workers: WorkersOpt = None,
    eval_data: EvalOpt = None,
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Flow-matching fine-tune of the bidirectional teacher on Ray Train, with condition dropout for CFG."""
    cfg = resolve_config(preset, config, set_)
    _apply(cfg, workers, eval_data)
    if init is not None:
        cfg.train.teacher.init_checkpoint = str(init)
    _run_training("teacher", cfg, data, out, max_steps, resume, address)


@train_app.command("ode")
@friendly_errors
def train_ode(
    data: Annotated[Path, typer.Option("--data", help="trajectory shards (`livetalk ode generate`)")],
    out: OutOpt,
    teacher: TeacherOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    workers: WorkersOpt = None,
    eval_data: EvalOpt = None,
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """ODE initialisation: the causal student (from the teacher's weights) regresses the teacher's trajectories."""
    cfg = resolve_config(preset, config, set_)
    _apply(cfg, workers, eval_data)
    _teacher(cfg, teacher)
    _run_training("ode", cfg, data, out, max_steps, resume, address)


@ode_app.command("generate")
@friendly_errors
def ode_generate(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="output directory (shards/ with ode_states)")],
    teacher: TeacherOpt = None,
    actors: Annotated[
        int | None, typer.Option("--actors", min=1, help="teacher actors (default train.ode.actors)")
    ] = None,
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the teacher sampler over every training condition and keep the states at the student's timesteps.
    Rerunning skips finished shards."""
    from livetalk_ray.train.launch import absolute_paths
    from livetalk_ray.train.ode import generate_trajectories

    cfg = resolve_config(preset, config, set_)
    _teacher(cfg, teacher)
    if actors is not None:
        cfg.train.ode.actors = actors
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist: pass the --out directory of `livetalk data prepare`")
    cfg = absolute_paths(cfg)
    with ray_session(address):
        stats = generate_trajectories(cfg, data, out)
    rate = f" ({stats['trajectories_per_s']:.2f}/s)" if stats["trajectories_per_s"] else ""
    console.print(
        f"{stats['trajectories']} trajectories in {stats['shards']} shards ({stats['made_this_run']} made now{rate})"
        f" → {out}",
        highlight=False,
    )


@train_app.command("dmd")
@friendly_errors
def train_dmd(
    data: DataOpt,
    out: OutOpt,
    generator: Annotated[
        Path | None, typer.Option("--generator", help="ODE-initialised student checkpoint directory")
    ] = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", help="teacher checkpoint directory")] = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """On-policy DMD with generator, critic, teacher and rollout actors (5 critic steps per generator step)."""
    from livetalk_ray.train.dmd.controller import run_dmd

    cfg = resolve_config(preset, config, set_)
    if generator is not None:
        cfg.train.dmd.generator_checkpoint = str(generator)
    if teacher is not None:
        cfg.train.dmd.teacher_checkpoint = str(teacher)
    stop = cfg.train.max_steps if max_steps is None else max_steps
    fields = "critic {task.fields[critic]} · staleness {task.fields[staleness]}"
    with ray_session(address), step_progress("dmd", fields) as bar:
        task = bar.add_task("steps", total=stop, critic="-", staleness="-")

        def show(record: dict) -> None:
            if "critic_loss" in record:
                critic = f"{record['critic_loss']:.4f}"
                bar.update(task, completed=record["step"], critic=critic, staleness=record["staleness"])

        summary = run_dmd(cfg, data, out, stop, resume=resume, on_progress=show)
    console.print(
        f"dmd: {summary['step']} critic steps, {summary['generator_steps']} generator steps → {summary['checkpoint']}",
        highlight=False,
    )


@train_app.command("tiny-decoder")
@friendly_errors
def train_tiny_decoder_command(
    data: Annotated[Path, typer.Option("--data", help="prepared shards (their latents) or a directory of clips")],
    out: OutOpt,
    vae: Annotated[Path | None, typer.Option("--vae", help="the full VAE to distil (default vae.path)")] = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Distil the tiny streaming decoder from the full VAE decoder (and the clips' frames) on Ray Train."""
    from livetalk_ray.train.launch import StageInterrupted
    from livetalk_ray.train.tiny_decoder import WEIGHTS, preflight, train_tiny_decoder

    cfg = resolve_config(preset, config, set_)
    preflight(data.resolve(), out.resolve(), resume)
    _apply(cfg, workers, None)
    if vae is not None:
        cfg.vae.path = str(vae)
    stop = cfg.train.max_steps if max_steps is None else max_steps
    with ray_session(address), step_progress("tiny decoder", "{task.fields[what]}") as bar:
        task = bar.add_task("full decodes", total=None, what="building the distillation set")

        def prepared(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def show(record: dict) -> None:
            bar.update(
                task, description="steps", completed=record["step"], total=stop, what=f"loss {record['loss']:.4f}"
            )

        try:
            summary = train_tiny_decoder(cfg, data, out, stop, resume=resume, on_prepare=prepared, on_progress=show)
        except StageInterrupted as exc:
            bar.stop()
            console.print(f"[yellow]{exc}[/]", highlight=False)
            raise typer.Exit(130) from None
    psnr = summary["psnr_vs_full_db"]
    line = f"tiny decoder: step {summary['step']} · held-out PSNR {psnr:.2f} dB against the full decoder"
    if "psnr_vs_truth_db" in summary:
        truth, full = summary["psnr_vs_truth_db"], summary["full_psnr_vs_truth_db"]
        line += f", {truth:.2f} dB against the clips (the full decoder: {full:.2f} dB)"
    console.print(
        f"{line} → use --set vae.decoder=tiny --set vae.tiny.path={summary['checkpoint']}/{WEIGHTS}", highlight=False
    )


@friendly_errors
def pipeline(
    out: Annotated[Path, typer.Option("--out", help="pipeline directory (every stage's output, stages/*.json)")],
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The whole toy chain: demo data → VAE → shards → teacher → ODE → DMD → export → eval; rerun to resume."""
    from livetalk_ray.toy_pipeline import run_pipeline

    cfg = resolve_config(preset, config, set_)
    if cfg.preset != "toy":
        raise ConfigError("pipeline builds the toy chain; real presets run the stages one by one (see README)")
    with ray_session(address):
        outputs = run_pipeline(cfg, out, console)
    console.print(f"student → {outputs['export']['checkpoint']}", highlight=False)
