"""`livetalk generate`: stream a talking head block by block into an mp4 and report its speed.

Each block is decoded and written to the file as soon as it exists (as a live session would send it);
audio is muxed as AAC alongside. Prints per-block latency split by stage, FPS and first-block latency.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.media import Mp4Writer


def run_generate(
    cfg: LiveTalkConfig,
    *,
    image: Path,
    audio: Path,
    out: Path,
    prompt: str,
    seconds: float | None,
    checkpoint: Path | None,
    console: Console,
) -> dict:
    from livetalk_ray.assets import with_embedded_weights
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.media import load_audio
    from livetalk_ray.models.image import load_reference_image

    # Inputs first: a bad file fails in a second, before any model is built.
    ref = load_reference_image(image, cfg.video.height, cfg.video.width)
    wave = load_audio(audio, cfg.audio.sample_rate)
    seconds = seconds if seconds is not None else len(wave) / cfg.audio.sample_rate
    num_frames = max(1, round(seconds * cfg.video.fps))
    num_blocks = cfg.blocks_for_video_frames(num_frames)

    cfg, checkpoint = with_embedded_weights(cfg, checkpoint)
    pipe = AvatarPipeline(cfg, checkpoint)
    start = time.perf_counter()
    stream = pipe.open_stream(ref, prompt)
    stream.push_audio(wave[: round(seconds * cfg.audio.sample_rate)])
    stream.finish_audio()
    writer = Mp4Writer(out, cfg.video.fps, cfg.video.width, cfg.video.height, cfg.audio.sample_rate)
    table = Table("block", "frames", "audio ms", "denoise ms", "refill ms", "decode ms", "total ms")
    rows, first_block_latency, written = [], None, 0
    for _ in range(num_blocks):
        block = stream.next_block()
        keep = min(len(block.frames), num_frames - written)
        sr_per_frame = cfg.audio.sample_rate / cfg.video.fps
        writer.write(block.frames[:keep], block.audio[: round(keep * sr_per_frame)])
        written += keep
        if first_block_latency is None:
            first_block_latency = time.perf_counter() - start
        t = block.timings
        rows.append({"block": block.index, "frames": keep, **t})
        table.add_row(
            str(block.index),
            str(keep),
            *(f"{1000 * t[k]:.0f}" for k in ("audio", "denoise", "refill", "decode", "total")),
        )
    writer.close()
    elapsed = time.perf_counter() - start
    summary = {
        "frames": written,
        "blocks": num_blocks,
        "seconds_of_video": written / cfg.video.fps,
        "wall_seconds": elapsed,
        "fps": written / elapsed,
        "first_block_latency_s": first_block_latency,
        "blocks_detail": rows,
    }
    console.print(table)
    console.print(
        f"wrote {out}: {written} frames ({written / cfg.video.fps:.2f} s) in {elapsed:.2f} s → "
        f"{summary['fps']:.1f} FPS, first block after {first_block_latency:.2f} s "
        f"(real time needs {cfg.video.fps} FPS)",
        highlight=False,
    )
    return summary
