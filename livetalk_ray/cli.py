"""`livetalk` command line. Every command takes `--preset`, `--config FILE` and `--set a.b=value`.

User errors (bad preset, unreadable image or audio, wrong checkpoint, ...) end with one red line and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from livetalk_ray.config import ConfigError, LiveTalkConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and serve real-time talking avatars.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect model presets and checkpoints.")
app.add_typer(model_app, name="model")
data_app = typer.Typer(no_args_is_help=True, help="Curate and encode clips into training shards (Ray Data).")
app.add_typer(data_app, name="data")
train_app = typer.Typer(no_args_is_help=True, help="Training stages (resumable, checkpoints under RUN_DIR).")
app.add_typer(train_app, name="train")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

PresetOpt = Annotated[str | None, typer.Option("--preset", help="toy | wan-1.3b | wan-14b (default toy)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set cache.sink_size=6")]


def _user_errors() -> tuple[type[Exception], ...]:
    from livetalk_ray.data.schema import SchemaError
    from livetalk_ray.models.audio import AudioError
    from livetalk_ray.models.checkpoint import CheckpointError
    from livetalk_ray.models.image import ImageError
    from livetalk_ray.models.vae import VAEError

    return ConfigError, ImageError, AudioError, CheckpointError, VAEError, SchemaError, FileNotFoundError


def friendly_errors(fn):
    """Turn the known user errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def resolve_config(preset: str | None, config: Path | None, overrides: list[str] | None) -> LiveTalkConfig:
    return load_config(preset, config, overrides)


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


@app.command()
@friendly_errors
def generate(
    image: Annotated[Path, typer.Option("--image", help="reference portrait (any format PIL reads)")],
    audio: Annotated[Path, typer.Option("--audio", help="speech (wav/flac/mp3/m4a/...), resampled to 16 kHz")],
    out: Annotated[Path, typer.Option("--out", help="output .mp4")],
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
    from livetalk_ray.generate import run_generate

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


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {exc}") from None


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to a cluster at `address`, or start a local Ray for the duration of the command."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs; clusters set their own auth mode
    if address and address != "auto" and not address.startswith("ray://"):
        _check_reachable(address)  # ray.init would retry an unreachable GCS for minutes
    kwargs = {"address": address} if address else {"include_dashboard": False}
    try:
        ray.init(log_to_driver=False, logging_level="ERROR", **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    input: Annotated[Path, typer.Option("--input", help="directory of clips, or a .jsonl/.parquet manifest")],
    out: Annotated[Path, typer.Option("--out", help="output directory (shards/, quarantine.parquet, stats.json)")],
    address: Annotated[str | None, typer.Option("--address", help="Ray cluster address; default: local Ray")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode, curate and encode clips into parquet shards; rejected clips are quarantined with a reason.
    Rerunning skips finished shards."""
    from livetalk_ray.data.pipeline import prepare

    cfg = resolve_config(preset, config, set_)
    if not input.exists():
        raise FileNotFoundError(f"--input {input} does not exist")
    with ray_session(address):
        stats = prepare(cfg, input, out)
    reasons = ", ".join(f"{k} {v}" for k, v in stats["reasons"].items()) or "none"
    console.print(
        f"{stats['clips_in']} clips in: {stats['accepted']} accepted into {stats['shards']} shards, "
        f"{stats['quarantined']} quarantined ({reasons}) → {out}",
        highlight=False,
    )


@app.command("demo-data")
@friendly_errors
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    clips: Annotated[int, typer.Option("--clips", min=1, help="number of clips")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    corrupt_fraction: Annotated[float, typer.Option("--corrupt-fraction", min=0.0, max=1.0)] = 0.0,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Render toy-world talking-head clips (mp4 + audio, reference image, caption), optionally some broken."""
    from livetalk_ray.toyworld.clips import make_demo_dataset

    cfg = resolve_config(preset, config, set_)
    infos = make_demo_dataset(
        out,
        clips,
        seed,
        corrupt_fraction=corrupt_fraction,
        fps=cfg.video.fps,
        height=cfg.video.height,
        width=cfg.video.width,
        sample_rate=cfg.audio.sample_rate,
    )
    broken = sum(1 for i in infos if i.corruption)
    console.print(f"wrote {len(infos)} clips ({broken} corrupted) to {out}", highlight=False)


@train_app.command("vae")
@friendly_errors
def train_vae_command(
    data: Annotated[Path, typer.Option("--data", help="directory of toy-world clips")],
    out: Annotated[Path, typer.Option("--out", help="run directory (checkpoints/step_NNNNNN/vae)")],
    max_steps: Annotated[int, typer.Option("--max-steps", min=0)] = 2000,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit the toy preset's VAE on toy-world clips and report PSNR (real presets use the Wan VAE)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from livetalk_ray.train.vae import train_vae

    cfg = resolve_config(preset, config, set_)
    if cfg.preset != "toy":
        raise ConfigError("train vae fits the toy VAE only; real presets load the pretrained Wan VAE (vae.path)")
    with Progress(
        TextColumn("[bold]vae"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("steps", total=max_steps, loss="-")
        result = train_vae(
            cfg,
            data,
            out,
            max_steps,
            resume,
            on_step=lambda step, loss: bar.update(task, completed=step, loss=f"{loss:.4f}"),
        )
    last = result["history"][-1]
    console.print(
        f"step {last['step']}: held-out PSNR {last['psnr_db']:.2f} dB → use --set vae.path={result['vae_path']}",
        highlight=False,
    )


if __name__ == "__main__":
    app()
