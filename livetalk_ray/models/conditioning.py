"""The frozen conditioning encoders (VAE, wav2vec2, umT5) built together for one config.

The data pipeline's encoder actors and the streaming pipeline need the very same three models on the
same device; this is the one place that builds them (random toy ones seeded with TOY_INIT_SEED)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


_NEGATIVE_TEXT: dict[str, torch.Tensor] = {}  # this process's encoded negative prompts, by cache key


def cache_dir() -> Path:
    """Where encodings worth keeping between runs go: $LIVETALK_CACHE_DIR, else ~/.cache/livetalk-ray."""
    return Path(os.environ.get("LIVETALK_CACHE_DIR") or Path.home() / ".cache" / "livetalk-ray")


def negative_text(cfg: LiveTalkConfig, device, dtype: torch.dtype) -> torch.Tensor:
    """The unconditional text of teacher CFG, [1, text.max_length, text_dim]: `sampler.negative_prompt`
    through the configured umT5, or zeros for the empty prompt. Encoded once per text encoder and prompt:
    kept in memory and on disk (`cache_dir()`), so a trainer role loads the encoder at most once per node."""
    prompt = cfg.sampler.negative_prompt
    if not prompt:
        return torch.zeros(1, cfg.text.max_length, cfg.model.text_dim, device=device, dtype=dtype)
    identity = json.dumps([cfg.text.model_dump(mode="json"), prompt, TOY_INIT_SEED], ensure_ascii=False)
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    if key not in _NEGATIVE_TEXT:
        path = cache_dir() / "negative_prompts" / f"{key}.safetensors"
        if path.is_file():
            embedding = load_file(path)["embedding"]
        else:
            encoder_device = resolve_device(cfg.runtime)
            encoder = build_text_encoder(
                cfg.text, TOY_INIT_SEED, device=encoder_device, dtype=resolve_dtype(cfg.runtime, encoder_device)
            )
            embedding = encoder.encode([prompt]).float().cpu()
            del encoder
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes of one node may race here
            save_file({"embedding": embedding.contiguous()}, tmp)
            os.replace(tmp, path)
        _NEGATIVE_TEXT[key] = embedding
    return _NEGATIVE_TEXT[key].to(device, dtype)
