"""Decoder tiers side by side in one run: the toy's full Wan decoder against its tiny decoder (`vae.decoder=tiny`).

    .venv/bin/python bench/decoder.py [--tiny FILE] [--clips DIR] [--rounds 15] [--out bench/results/decoder.json]

- speed: one stream's steady block (3 latent frames → 12 frames) on one thread, full and tiny interleaved round by
  round (medians), as a VAEDecoder replica computes it;
- quality on held-out toy-world clips (default: 16 rendered with the pipeline's held-out seed, people no training
  set holds): each clip's first 33 frames through the full VAE's encoder, then each decoder; PSNR against the
  clip, and the identity distance (toyworld.measure) of the decoded frames to the clip's own frames.

Goals (issue 18): tiny ≥ 5x faster per block, within 1.5 dB of the full decoder's PSNR, identity distance within
0.02 of the full decoder's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from livetalk_ray.assets import TINY_DECODER_FILE, TOY_DIR
from livetalk_ray.config import load_config


def held_out_clips(directory: Path | None, cfg) -> np.ndarray:
    from livetalk_ray.toyworld.clips import make_demo_dataset
    from livetalk_ray.train.vae import load_clips

    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="livetalk-bench-decoder-"))
        v = cfg.video
        make_demo_dataset(directory, 16, 2, fps=v.fps, height=v.height, width=v.width, progress=False)
    return np.stack(load_clips(directory, cfg))


def block_seconds(decoders: dict, latents: torch.Tensor, rounds: int, cfg) -> dict[str, float]:
    """Median seconds per steady block of one stream, the decoders interleaved round by round."""
    from livetalk_ray.eval.table import steady_block_seconds

    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            times[name].append(steady_block_seconds(decoder, latents, cfg, repeats=1))
    return {name: float(np.median(t)) for name, t in times.items()}


def quality(decoders: dict, latents: torch.Tensor, truth: np.ndarray) -> dict[str, dict[str, float]]:
    from livetalk_ray.models.image import psnr_db
    from livetalk_ray.toyworld.measure import identity_descriptor, identity_distance

    out = {}
    for name, decoder in decoders.items():
        frames = np.concatenate([decoder.decode_frames(latents[i : i + 4]) for i in range(0, len(latents), 4)])
        pairs = zip(frames, truth, strict=True)
        identity = [identity_distance(identity_descriptor(f), identity_descriptor(t)) for f, t in pairs]
        out[name] = {
            "psnr_db": psnr_db(frames, truth),
            "identity_distance": float(np.nanmean(identity)),
            "faces_lost": int(np.sum(~np.isfinite(identity))),
        }
    return out


def _shown(path: Path) -> str:
    """A path as the JSON records it: relative to the repository when inside it (results carry no machine paths)."""
    root = Path(__file__).resolve().parents[1]
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", type=Path, default=TOY_DIR / TINY_DECODER_FILE)
    parser.add_argument("--clips", type=Path, default=None, help="held-out clips (default: 16 rendered now)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoder.json")
    args = parser.parse_args()

    from livetalk_ray.models.vae import frame_decoder
    from livetalk_ray.train.vae import to_video

    torch.set_num_threads(1)  # what one VAEDecoder replica computes on
    cfg = load_config("toy", overrides=[f"vae.path={TOY_DIR / 'vae'}", f"vae.tiny.path={args.tiny}"])
    full = frame_decoder(cfg.vae)
    decoders = {"full": full, "tiny": frame_decoder(cfg.vae.model_copy(update={"decoder": "tiny"}))}
    truth = held_out_clips(args.clips, cfg)
    latents = torch.cat([full.encode(to_video(truth[i : i + 4])) for i in range(0, len(truth), 4)])
    speed = block_seconds(decoders, latents[:1], args.rounds, cfg)
    scores = quality(decoders, latents, truth)
    result = {
        "tiny": _shown(args.tiny),
        "clips": len(truth),
        "block_seconds": speed,
        "quality": scores,
        "ratios": {
            "tiny_speedup": speed["full"] / speed["tiny"],
            "psnr_gap_db": scores["full"]["psnr_db"] - scores["tiny"]["psnr_db"],
            "identity_gap": scores["tiny"]["identity_distance"] - scores["full"]["identity_distance"],
        },
    }
    goals = {"tiny_speedup": (">=", 5.0), "psnr_gap_db": ("<=", 1.5), "identity_gap": ("<=", 0.02)}
    result["met"] = {
        k: (v >= goals[k][1] if goals[k][0] == ">=" else v <= goals[k][1]) for k, v in result["ratios"].items()
    }
    table = Table(title=f"decoder tiers, toy preset, 1 thread, {len(truth)} held-out clips, {args.rounds} rounds")
    for col in ("decoder", "ms per block", "PSNR dB", "identity distance", "faces lost"):
        table.add_column(col)
    for name in decoders:
        q = scores[name]
        table.add_row(
            name,
            f"{1000 * speed[name]:.1f}",
            f"{q['psnr_db']:.2f}",
            f"{q['identity_distance']:.3f}",
            str(q["faces_lost"]),
        )
    for name, value in result["ratios"].items():
        op, goal = goals[name]
        table.add_row(name, f"{value:.2f}", f"goal {op} {goal}", "met" if result["met"][name] else "NOT met", "")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
