"""Teacher stage: the bidirectional `WanDiT` fine-tuned with flow matching on the prepared shards.

x_t = (1 - σ)·x0 + σ·ε with σ from the shifted schedule; the model predicts v = ε - x0. Latent frame 0 is
the clean reference latent (overwritten in x_t, as at sampling time) and is left out of the loss. Per
sample, text, audio and the reference are dropped with the configured probabilities so that classifier-free
guidance has an unconditional model to subtract. Real runs start from merged OmniAvatar weights
(`train.teacher.init_checkpoint`); the toy preset trains from scratch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.reader import check_shards
from livetalk_ray.diffusion.clips import CONDITION_COLUMNS, conditions, sample_clips
from livetalk_ray.diffusion.flow import FlowSchedule
from livetalk_ray.diffusion.sampler import reference_condition
from livetalk_ray.models.checkpoint import import_weights
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.loop import Stage


def teacher_loss(
    model: WanDiT, batch: dict[str, torch.Tensor], cfg: LiveTalkConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean flow-matching MSE over latent frames 1..F-1 for a batch of `latents`, `ref_latent`,
    `audio_features` and `text_embedding` (as the shard readers yield them)."""
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    x0 = batch["latents"].to(dev, torch.float32)
    b = x0.shape[0]
    ref, text, audio = conditions(batch, cfg, dev, dtype)

    def keep(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=dev) >= p).to(torch.float32)

    drop = cfg.train.teacher
    text = text * keep(drop.text_dropout).view(b, 1, 1).to(dtype)
    audio = audio * keep(drop.audio_dropout).view(b, 1, 1, 1).to(dtype)
    ref = ref * keep(drop.reference_dropout).view(b, 1, 1, 1, 1)

    flow = FlowSchedule(cfg.sampler)
    t = flow.sample_train_timesteps((b,), generator=generator).to(dev, torch.float32)
    noise = torch.randn(x0.shape, generator=generator, device=dev)
    xt = flow.add_noise(x0, noise, flow.sigma_of(t))
    xt[:, :, :1] = ref  # the reference frame is given, not generated
    y = reference_condition(ref, x0.shape[2])
    v = model(xt.to(dtype), t, text, y.to(dtype), audio)
    target = flow.velocity_target(x0, noise)
    return torch.mean((v.float() - target)[:, :, 1:] ** 2)


def build_teacher(cfg: LiveTalkConfig, device, dtype) -> WanDiT:
    model = WanDiT.materialize(
        cfg.model, device=device, dtype=dtype, causal=False, frames_per_block=cfg.cache.frames_per_block
    )
    if cfg.train.teacher.init_checkpoint:
        # Raises on anything that does not fit; only audio modules absent from a base Wan checkpoint stay new.
        import_weights(model, cfg.train.teacher.init_checkpoint)
    return model


def teacher_columns(cfg: LiveTalkConfig) -> list[str]:
    return ["latents", *CONDITION_COLUMNS]


def teacher_shards(directory: str | Path, cfg: LiveTalkConfig) -> list[Path]:
    return check_shards(directory, cfg)


STAGE = Stage("teacher", build_teacher, teacher_loss, teacher_columns, teacher_shards, sample_clips)
