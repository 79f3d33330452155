"""Whole clips from a batch of prepared shard rows: its conditions, the teacher's CFG samples, and the
student's rollout through the KV cache. Trainers (teacher eval, ODE, DMD) and `livetalk eval` share these.
"""

from __future__ import annotations

import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.sampler import StreamingSampler, sample_teacher
from livetalk_ray.models.conditioning import negative_text
from livetalk_ray.models.dit import WanDiT, group_audio_frames

# The shard columns a clip's conditions come from.
CONDITION_COLUMNS = ["ref_latent", "audio_features", "text_embedding"]
# ...and those of an evaluation sample: the conditions plus the ground truth, its speech and its portrait.
EVAL_COLUMNS = [*CONDITION_COLUMNS, "latents", "audio", "ref_image"]
# The noise seed of every evaluation sample (training reports, `livetalk eval`, benchmarks): the same noise
# at every checkpoint and for every model, so their samples are comparable.
SAMPLE_SEED = 1234


def conditions(batch: dict, cfg: LiveTalkConfig, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference latent [B, C, 1, h, w] (fp32), text [B, L, D] and grouped audio [B, F, 4, D] of a batch."""
    ref = batch["ref_latent"].to(device, torch.float32)
    text = batch["text_embedding"].to(device, dtype)
    audio = group_audio_frames(batch["audio_features"].to(device, dtype), cfg.model.audio_frames_per_latent)
    return ref, text, audio


@torch.no_grad()
def sample_clips(model: WanDiT, cfg: LiveTalkConfig, batch: dict, seed: int) -> torch.Tensor:
    """The teacher's many-step CFG samples for a batch of conditions (unconditional text: `negative_text`)."""
    param = next(model.parameters())
    ref, text, audio = conditions(batch, cfg, param.device, param.dtype)
    shape = (ref.shape[0], cfg.vae.z_dim, cfg.clip_latent_frames, cfg.latent_height, cfg.latent_width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
    negative = negative_text(cfg, param.device, param.dtype).expand_as(text)
    latents, _ = sample_teacher(model, cfg, noise, ref.to(param.dtype), text, negative, audio)
    return latents


def rollout(
    model: WanDiT,
    cfg: LiveTalkConfig,
    ref: torch.Tensor,
    text: torch.Tensor,
    audio: torch.Tensor,
    seed: int,
    exit_step: int | None = None,
    grad: bool = False,
) -> torch.Tensor:
    """A clip streamed block by block through the KV cache, as served. With `exit_step` every block ends at
    that denoising step (Self-Forcing's training rollout), with a graph through it only when `grad`."""
    sampler = StreamingSampler(model, cfg)
    state = sampler.start(ref, text, seed=seed)
    fpb = cfg.cache.frames_per_block
    blocks = [
        sampler.next_block(state, audio[:, i : i + fpb], exit_step=exit_step, grad=grad)
        for i in range(0, cfg.clip_latent_frames, fpb)
    ]
    return torch.cat(blocks, dim=2)


@torch.no_grad()
def sample_stream(model: WanDiT, cfg: LiveTalkConfig, batch: dict, seed: int) -> torch.Tensor:
    """The student's few-step samples of a batch of conditions, streamed as served."""
    param = next(model.parameters())
    return rollout(model, cfg, *conditions(batch, cfg, param.device, param.dtype), seed)
