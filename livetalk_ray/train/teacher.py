"""Teacher flow-matching objective (bidirectional WanDiT), as a pure function of a shard batch.

x_t = (1 - σ)·x0 + σ·ε with σ from the shifted schedule; the model predicts v = ε - x0. Latent frame 0 is
the clean reference latent (overwritten in x_t, as at sampling time) and is left out of the loss. Per
sample, text, audio and the reference are dropped with the configured probabilities so that classifier-free
guidance has an unconditional model to subtract.
"""

from __future__ import annotations

import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.diffusion.flow import FlowSchedule
from livetalk_ray.diffusion.sampler import reference_condition
from livetalk_ray.models.dit import WanDiT, group_audio_frames


def teacher_loss(
    model: WanDiT, batch: dict[str, torch.Tensor], cfg: LiveTalkConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean flow-matching MSE over latent frames 1..F-1 for a batch of `latents`, `ref_latent`,
    `audio_features` and `text_embedding` (as `data.reader` yields them)."""
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    x0 = batch["latents"].to(dev, torch.float32)
    b = x0.shape[0]
    ref = batch["ref_latent"].to(dev, torch.float32)
    text = batch["text_embedding"].to(dev, dtype)
    audio = group_audio_frames(batch["audio_features"].to(dev, dtype), cfg.model.audio_frames_per_latent)

    def keep(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=dev) >= p).to(torch.float32)

    drop = cfg.train.teacher
    text = text * keep(drop.text_dropout).view(b, 1, 1).to(dtype)
    audio = audio * keep(drop.audio_dropout).view(b, 1, 1, 1).to(dtype)
    ref = ref * keep(drop.reference_dropout).view(b, 1, 1, 1, 1)

    flow = FlowSchedule(cfg.sampler)
    t = flow.sample_train_timesteps((b,), generator=generator).to(dev, torch.float32)
    noise = torch.randn(x0.shape, generator=generator, device=dev)
    xt = flow.add_noise(x0, noise, t / flow.num_train_timesteps)
    xt[:, :, :1] = ref  # the reference frame is given, not generated
    y = reference_condition(ref, x0.shape[2])
    v = model(xt.to(dtype), t, text, y.to(dtype), audio)
    target = flow.velocity_target(x0, noise)
    return torch.mean((v.float() - target)[:, :, 1:] ** 2)
