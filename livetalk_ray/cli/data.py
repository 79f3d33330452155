"""`livetalk data ...` and `livetalk demo-data`."""

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

data_app = typer.Typer(no_args_is_help=True, help="Curate and encode clips into training shards (Ray Data).")


@data_app.command("prepare")
@friendly_errors
def data_prepare(
    input: Annotated[Path, typer.Option("--input", help="directory of clips, or a .jsonl/.parquet manifest")],
    out: Annotated[Path, typer.Option("--out", help="output directory (shards/, quarantine.parquet, stats.json)")],
    address: AddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode, curate and encode clips into parquet shards; rejected clips are quarantined with a reason.
    Rerunning skips finished shards."""
    from livetalk_ray.data.pipeline import prepare

    cfg = resolve_config(preset, config, set_)
    if not input.exists():
        raise FileNotFoundError(
            f"--input {input} does not exist: pass a directory of clips or a .jsonl/.parquet manifest "
            "(`livetalk demo-data --out DIR` makes toy clips)"
        )
    with ray_session(address):
        stats = prepare(cfg, input, out)
    reasons = ", ".join(f"{k} {v}" for k, v in stats["reasons"].items()) or "none"
    console.print(
        f"{stats['clips_in']} clips in: {stats['accepted']} accepted into {stats['shards']} shards, "
        f"{stats['quarantined']} quarantined ({reasons}) → {out}",
        highlight=False,
    )


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
