"""The frozen conditioning encoders (VAE, wav2vec2, umT5) built together for one config.

The data pipeline's encoder actors and the streaming pipeline need the very same three models on the
same device; this is the one place that builds them (random toy ones seeded with TOY_INIT_SEED)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.models.audio import AudioEncoder, build_audio_encoder
from livetalk_ray.models.text import TextEncoder, build_text_encoder
from livetalk_ray.models.vae import WanVAE


@dataclass
class Conditioners:
    vae: WanVAE
    audio: AudioEncoder
    text: TextEncoder
    device: str
    dtype: torch.dtype


def build_conditioners(cfg: LiveTalkConfig) -> Conditioners:
    device = resolve_device(cfg.runtime)
    dtype = resolve_dtype(cfg.runtime, device)
    return Conditioners(
        vae=WanVAE(cfg.vae, device=device, dtype=dtype, seed=TOY_INIT_SEED),
        audio=build_audio_encoder(cfg.audio, TOY_INIT_SEED, device=device, dtype=dtype),
        text=build_text_encoder(cfg.text, TOY_INIT_SEED, device=device, dtype=dtype),
        device=device,
        dtype=dtype,
    )
