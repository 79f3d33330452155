"""`livetalk model ...` and `livetalk generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from livetalk_ray.cli.common import ConfigOpt, PresetOpt, SetOpt, console, friendly_errors, resolve_config
from livetalk_ray.config import ConfigError

model_app = typer.Typer(no_args_is_help=True, help="Inspect model presets and checkpoints.")


@model_app.command("info")
@friendly_errors
def model_info(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="list every tensor: '<name> <d0>x<d1>...'")] = False,
) -> None:
    """Parameter and tensor count of a preset, built on the meta device (no memory is allocated)."""
    import torch

    from livetalk_ray.models.dit import WanDiT

    cfg = resolve_config(preset, config, set_)
    with torch.device("meta"):
        model = WanDiT(cfg.model)
    state = model.state_dict()
    params = sum(t.numel() for t in state.values())
    console.print(f"preset {cfg.preset}: {params:,} parameters in {len(state)} tensors", highlight=False)
    if keys:
        for name in sorted(state):
            print(f"{name} {'x'.join(str(d) for d in state[name].shape)}")


@model_app.command("import")
@friendly_errors
def model_import(
    source: Annotated[Path, typer.Argument(help="LiveTalk/OmniAvatar safetensors, diffusers dir, or Self-Forcing .pt")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint directory to write")],
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")] = "bfloat16",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Self-Forcing dicts: take generator_ema")] = True,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Turn released weights into a livetalk checkpoint directory (model.safetensors + config.yaml)."""
    import torch

    from livetalk_ray.models.checkpoint import import_weights, save_checkpoint
    from livetalk_ray.models.dit import WanDiT

    cfg = resolve_config(preset or ("wan-1.3b" if config is None else None), config, set_)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    model = WanDiT.materialize(cfg.model, dtype=getattr(torch, dtype), frames_per_block=cfg.cache.frames_per_block)
    report = import_weights(model, source, use_ema=ema)
    save_checkpoint(model, cfg, out)
    console.print(f"imported {report.loaded} tensors ({report.layout} layout) into {out}", highlight=False)
    for label, keys in (("initialised", report.initialised), ("adapted", report.adapted), ("ignored", report.ignored)):
        if keys:
            console.print(
                f"  {label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}", highlight=False
            )


@friendly_errors
def generate(
    out: Annotated[Path, typer.Option("--out", help="output .mp4")],
    image: Annotated[
        Path | None, typer.Option("--image", help="reference portrait (any format PIL reads); default: the demo's")
    ] = None,
    audio: Annotated[
        Path | None,
        typer.Option("--audio", help="speech (wav/flac/mp3/m4a/...), resampled to 16 kHz; default: the demo's"),
    ] = None,
    text: Annotated[str, typer.Option("--text", help="motion-focused prompt")] = (
        "A person talks to the camera with natural lip movements and subtle head motion."
    ),
    seconds: Annotated[float | None, typer.Option("--seconds", min=0.1, help="length; default: the audio's")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="checkpoint directory")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Stream a talking-head video block by block and write it as mp4 with the audio muxed in."""
    from livetalk_ray.assets.demo import DEMO_PORTRAIT, DEMO_SPEECH
    from livetalk_ray.generate import run_generate

    if image is None or audio is None:
        shown = [name for name, given in (("portrait", image), ("speech", audio)) if given is None]
        console.print(f"[dim]using the bundled demo {' and '.join(shown)} (--image / --audio choose your own)[/]")
    image, audio = image or DEMO_PORTRAIT, audio or DEMO_SPEECH

    if checkpoint is not None and preset is None and config is None:
        cfg_file: Path | None = checkpoint / "config.yaml"
        if not cfg_file.is_file():
            raise ConfigError(f"{checkpoint} is not a livetalk checkpoint (no config.yaml)")
    else:
        cfg_file = config
    cfg = resolve_config(preset, cfg_file, set_)
    if seed is not None:
        cfg.runtime.seed = seed
    run_generate(
        cfg, image=image, audio=audio, out=out, prompt=text, seconds=seconds, checkpoint=checkpoint, console=console
    )


@friendly_errors
def export(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="DMD run directory or one of its step directories")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint directory to write")],
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="the EMA weights (default) or the raw ones")] = True,
) -> None:
    """Write the DMD student (EMA) in LiveTalk's layout: model.safetensors + config.yaml."""
    from livetalk_ray.train.dmd.export import export_generator

    directory, used_ema = export_generator(checkpoint, out, use_ema=ema)
    kind = "EMA" if used_ema else "raw (no EMA yet)" if ema else "raw"
    console.print(f"exported the {kind} generator → {directory}", highlight=False)


@friendly_errors
def evaluate_command(
    teacher: Annotated[Path | None, typer.Option("--teacher", help="teacher checkpoint directory")] = None,
    ode: Annotated[Path | None, typer.Option("--ode", help="ODE-initialised student checkpoint")] = None,
    dmd: Annotated[Path | None, typer.Option("--checkpoint", "--dmd", help="DMD student (exported)")] = None,
    people: Annotated[int, typer.Option("--people", min=1, max=6, help="bundled portraits streamed")] = 2,
    seconds: Annotated[float, typer.Option("--seconds", min=2.0, help="seconds streamed per portrait")] = 60.0,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="held-out prepared shards: adds the clip table")
    ] = None,
    clips: Annotated[int, typer.Option("--clips", min=2, help="held-out clips of the clip table")] = 8,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="directory for eval.md, eval.json, identity_lipsync.png, strips.png"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object: `long` (and `rows`)")] = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The toy paper table: held-out portraits streamed for a minute by the truth, the VAE, the teacher and
    both students (with and without identity sinks), scored second by second for identity and lip-sync.
    Without model options it evaluates the shipped toy chain."""
    import json

    from rich.progress import Progress

    from livetalk_ray.assets import TOY_DIR, toy_weights_available, with_embedded_weights
    from livetalk_ray.eval.longform import evaluate_long, portrait_talks, rows_for

    cfg = resolve_config(preset, config, set_)
    if cfg.preset != "toy":
        raise ConfigError("eval scores toy-world portraits, so it evaluates toy-preset models only (--preset toy)")
    if teacher is None and ode is None and dmd is None:
        if not toy_weights_available() or not (TOY_DIR / "teacher").is_dir():
            raise ConfigError(
                "the shipped toy weights hold no teacher and ODE student yet: name the models with --teacher, "
                f"--ode and --checkpoint (the shipped student: --checkpoint {TOY_DIR})"
            )
        teacher, ode, dmd = TOY_DIR / "teacher", TOY_DIR / "ode", TOY_DIR
    named = [Path(p).resolve() for p in (teacher, ode, dmd) if p is not None]
    if any(p.is_relative_to(TOY_DIR.resolve()) for p in named):
        cfg, _ = with_embedded_weights(cfg, TOY_DIR)  # the shipped VAE goes with the shipped models
    for path in (teacher, ode, dmd):
        if path is not None and not (Path(path) / "model.safetensors").is_file():
            raise ConfigError(f"{path} is not a checkpoint directory (no model.safetensors)")
    models = rows_for(teacher, ode, dmd)
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("rendering held-out portraits", total=None)
        talks = portrait_talks(cfg, seconds, people)
        bar.update(task, description="streaming", total=len(talks) * len(models), completed=0)
        long = evaluate_long(cfg, models, talks, seconds, out, progress=lambda *_: bar.advance(task))
    from livetalk_ray.eval.table import Candidate, evaluate, write_report

    rows = None
    if eval_data is not None:
        candidates = [
            Candidate(name, Path(path), streaming)
            for name, path, streaming in (("teacher", teacher, False), ("ode", ode, True), ("dmd", dmd, True))
            if path is not None
        ]
        rows = evaluate(cfg, candidates, eval_data, seconds=min(seconds, 10.0), clips=clips, out_dir=out)
    result, text = write_report(long, rows, out)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(text.rstrip("\n"), highlight=False)
