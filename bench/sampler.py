"""Streaming sampler benchmark: measured toy numbers on this machine, and wan-1.3b FLOPs on paper.

    .venv/bin/python bench/sampler.py [--blocks 12] [--out bench/results/sampler.json]

Part 1 streams the toy preset with the real portrait and speech fixtures through the same
AvatarPipeline as `livetalk generate` and reports the per-block split (audio window, denoising steps,
KV refill, VAE decode), FPS and first-block latency. Part 2 counts the FLOPs of one steady-state block
of LiveTalk-1.3B at 512x512 (5 DiT passes over a full 15-frame window, streaming VAE decode of 3 latent
frames) with torch's FlopCounterMode on the meta device, and turns them into a predicted H100 time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from livetalk_ray.config import load_config

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16
ASSUMED_MFU = 0.40
LIVETALK_FPS, LIVETALK_FIRST_FRAME_S = 24.82, 0.33  # LiveTalk README


def measure_toy(blocks: int) -> dict:
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.media import load_audio
    from livetalk_ray.models.image import load_reference_image

    cfg = load_config("toy")
    pipe = AvatarPipeline(cfg)
    ref = load_reference_image(FIXTURES / "portrait.jpg", cfg.video.height, cfg.video.width)
    wave = load_audio(FIXTURES / "speech_16k.wav")
    # warm-up stream: first calls pay one-off allocation and kernel selection
    warm = pipe.open_stream(ref, "warm-up")
    warm.push_audio(wave)
    warm.finish_audio()
    warm.next_block()

    start = time.perf_counter()
    stream = pipe.open_stream(ref, "A person talks to the camera.")
    prime = time.perf_counter() - start
    stream.push_audio(wave)
    stream.finish_audio()
    rows, first_latency, frames = [], None, 0
    for _ in range(blocks):
        out = stream.next_block()
        first_latency = first_latency or time.perf_counter() - start
        frames += len(out.frames)
        rows.append({"frames": len(out.frames), **out.timings})
    wall = time.perf_counter() - start
    steady = rows[1:]  # block 0 is shorter (9 frames) and attends to less
    median = {k: statistics.median(r[k] for r in steady) for k in ("audio", "denoise", "refill", "decode", "total")}
    return {
        "preset": "toy",
        "blocks": blocks,
        "frames": frames,
        "wall_s": wall,
        "prime_s": prime,
        "fps": frames / wall,
        "steady_fps": 12 / median["total"],
        "realtime_factor": frames / cfg.video.fps / wall,
        "first_block_latency_s": first_latency,
        "median_block_s": median,
        "per_step_s": median["denoise"] / len(pipe.sampler.steps.timesteps),
        "blocks_detail": rows,
        "torch_threads": torch.get_num_threads(),
    }


def flops_on_paper() -> dict:
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    from livetalk_ray.models.dit import WanDiT

    cfg = load_config("wan-1.3b")
    fpb, meta = cfg.cache.frames_per_block, torch.device("meta")
    with meta:
        dit = WanDiT(cfg.model)
        vae = AutoencoderKLWan()  # the Wan 2.1 VAE architecture
    cache = dit.new_cache(
        1, cfg.tokens_per_frame, cfg.cache.local_attn_size, cfg.cache.sink_size, device=meta, dtype=torch.bfloat16
    )
    h, w = cfg.latent_height, cfg.latent_width
    x, y = torch.zeros(1, 16, fpb, h, w, device=meta), torch.zeros(1, 17, fpb, h, w, device=meta)
    text = torch.zeros(1, cfg.text.max_length, cfg.model.text_dim, device=meta)
    audio = torch.zeros(1, fpb, 4, cfg.model.audio_feature_dim, device=meta)
    t = torch.zeros(1, fpb, device=meta)
    window_blocks = cfg.cache.local_attn_size // fpb
    for b in range(window_blocks):  # fill the window so the measured pass attends to all 15 frames
        dit.forward_cached(x, t, text, y, cache, b * fpb, audio)
    with FlopCounterMode(display=False) as counter:
        dit.forward_cached(x, t, text, y, cache, window_blocks * fpb, audio)
    dit_pass = counter.get_total_flops()
    feat = [None] * vae._cached_conv_counts["decoder"]
    z = vae.post_quant_conv(torch.zeros(1, 16, fpb, h, w, device=meta))
    vae.decoder(z[:, :, :1], feat_cache=feat, feat_idx=[0], first_chunk=True)
    with FlopCounterMode(display=False) as counter:
        z = vae.post_quant_conv(torch.zeros(1, 16, fpb, h, w, device=meta))
        for i in range(fpb):
            vae.decoder(z[:, :, i : i + 1], feat_cache=feat, feat_idx=[0])
    decode = counter.get_total_flops()
    passes = cfg.sampler.student_steps + 1  # denoising steps + clean-context refill
    block = passes * dit_pass + decode
    sustained = H100_BF16_DENSE_TFLOPS * 1e12 * ASSUMED_MFU
    block_s = block / sustained
    frames = cfg.model.audio_frames_per_latent * fpb
    return {
        "preset": "wan-1.3b",
        "resolution": "512x512",
        "frames_per_block": frames,
        "dit_pass_tflop": dit_pass / 1e12,
        "dit_passes": passes,
        "vae_decode_tflop": decode / 1e12,
        "block_tflop": block / 1e12,
        "h100_bf16_tflops": H100_BF16_DENSE_TFLOPS,
        "assumed_mfu": ASSUMED_MFU,
        "predicted_block_s": block_s,
        "predicted_fps": frames / block_s,
        "livetalk_fps": LIVETALK_FPS,
        "livetalk_first_frame_s": LIVETALK_FIRST_FRAME_S,
        "livetalk_implied_block_s": frames / LIVETALK_FPS,
        "livetalk_implied_mfu": block / (frames / LIVETALK_FPS) / (H100_BF16_DENSE_TFLOPS * 1e12),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sampler.json"))
    args = parser.parse_args()
    console = Console(width=120)

    toy = measure_toy(args.blocks)
    table = Table(title=f"toy preset, {toy['torch_threads']} CPU threads: median block after the first")
    table.add_column("stage")
    table.add_column("ms / block", justify="right")
    table.add_column("share", justify="right")
    for k in ("audio", "denoise", "refill", "decode"):
        v = toy["median_block_s"][k]
        table.add_row(k, f"{1000 * v:.1f}", f"{v / toy['median_block_s']['total']:.0%}")
    table.add_row("total", f"{1000 * toy['median_block_s']['total']:.1f}", "100%")
    console.print(table)
    console.print(
        f"toy: {toy['frames']} frames in {toy['wall_s']:.2f} s → {toy['fps']:.1f} FPS "
        f"(steady {toy['steady_fps']:.1f} FPS, {toy['realtime_factor']:.2f}x real time at 16 fps); "
        f"first block after {toy['first_block_latency_s']:.3f} s (prime {toy['prime_s']:.3f} s)",
        highlight=False,
    )

    paper = flops_on_paper()
    table = Table(title="wan-1.3b at 512x512, one steady-state block (12 frames), on paper")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("DiT pass (3072 queries, 15-frame window)", f"{paper['dit_pass_tflop']:.2f} TFLOP")
    passes = paper["dit_passes"]
    table.add_row(f"x {passes} passes (4 steps + refill)", f"{passes * paper['dit_pass_tflop']:.1f} TFLOP")
    table.add_row("VAE decode, 3 latent frames", f"{paper['vae_decode_tflop']:.1f} TFLOP")
    table.add_row("block total", f"{paper['block_tflop']:.1f} TFLOP")
    table.add_row(
        f"H100 at {paper['h100_bf16_tflops']:.0f} TFLOP/s x MFU {paper['assumed_mfu']:.0%}",
        f"{paper['predicted_block_s']:.3f} s/block → {paper['predicted_fps']:.1f} FPS",
    )
    table.add_row(
        "LiveTalk README",
        f"{paper['livetalk_fps']} FPS → {paper['livetalk_implied_block_s']:.3f} s/block "
        f"(MFU {paper['livetalk_implied_mfu']:.0%} if H100), first frame {paper['livetalk_first_frame_s']} s",
    )
    console.print(table)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": torch.get_num_threads(),
        },
        "toy": toy,
        "wan_1_3b_on_paper": paper,
    }
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
