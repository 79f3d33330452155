"""LiveTalk's own outputs for case A (see README.md here): the config and weights as livetalk-ray builds
them, and our model's and sampler's answers to the same inputs, for the tests and `bench/parity.py`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.diffusion.sampler import StreamingSampler
from livetalk_ray.models.dit import WanDiT, group_audio_frames

HERE = Path(__file__).resolve().parent / "livetalk"
TAGS = ("released", "fp32steps")
# The setting that reproduces each streamed variant (the wan presets' default is LiveTalk's released inference).
TAG_OVERRIDES = {"released": [], "fp32steps": ["sampler.student_timestep_dtype=float32"]}


def livetalk_kwargs() -> dict:
    return json.loads((HERE / "case_A_config.json").read_text())


def config(tag: str = "released") -> LiveTalkConfig:
    """The wan-1.3b preset at case A's sizes (16x16 latents = 128x128 video)."""
    info = livetalk_kwargs()
    kw = info["livetalk_kwargs"]
    sizes = [f"model.{k}={kw[k]}" for k in ("dim", "ffn_dim", "num_heads", "num_layers", "audio_hidden_size")]
    side = info["latent_hw"] * 8
    video = [f"video.height={side}", f"video.width={side}"]
    return load_config("wan-1.3b", overrides=[*sizes, *video, *TAG_OVERRIDES[tag]])


def model(cfg: LiveTalkConfig, causal: bool) -> WanDiT:
    """Case A's weights, in LiveTalk's released layout, loaded strictly."""
    net = WanDiT(cfg.model, causal=causal, frames_per_block=cfg.cache.frames_per_block)
    net.load_state_dict(load_file(HERE / "case_A_weights.safetensors"), strict=True)
    return net.eval().requires_grad_(False)


def bidirectional() -> dict[str, torch.Tensor]:
    return load_file(HERE / "case_A_bidirectional.safetensors")


def stream() -> dict[str, torch.Tensor]:
    return load_file(HERE / "case_A_stream.safetensors")


def bidirectional_output(net: WanDiT, goldens: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    g = {k.split(".", 1)[1]: v for k, v in goldens.items() if k.startswith(f"{i}.")}
    with torch.no_grad():
        return net(g["x"], g["t"], g["context"], g["y"], group_audio_frames(g["audio_emb"]))


def streamed_blocks(net: WanDiT, cfg: LiveTalkConfig, goldens: dict[str, torch.Tensor], tag: str) -> list[torch.Tensor]:
    """Our streaming sampler over case A's 7 blocks with LiveTalk's stored noise draws."""
    sampler = StreamingSampler(net, cfg)
    state = sampler.start(goldens["ref_latent"], goldens["text"])
    audio = group_audio_frames(goldens["audio_emb"])
    fpb, steps = cfg.cache.frames_per_block, len(sampler.steps.timesteps)
    blocks = []
    for b in range(livetalk_kwargs()["stream"]["blocks"]):
        noise = [goldens[f"{tag}.noise.{b}.{s}"] for s in range(steps)]
        blocks.append(sampler.next_block(state, audio[:, b * fpb : (b + 1) * fpb], noise=noise))
    return blocks


def relative_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).norm() / theirs.float().norm())
