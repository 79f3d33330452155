"""Encoders of the data pipeline: curated clip → VAE latents, wav2vec2 features, umT5 text embedding.

`ClipEncoder` loads the three frozen models once (the pipeline runs it as a Ray Data actor pool) and
encodes a batch of curated clips; it knows nothing of Ray.
"""

from __future__ import annotations

import numpy as np
import torch

from livetalk_ray.config import TOY_INIT_SEED, LiveTalkConfig, resolve_device, resolve_dtype
from livetalk_ray.data.curation import CuratedClip


class ClipEncoder:
    def __init__(self, cfg: LiveTalkConfig) -> None:
        from livetalk_ray.models.audio import build_audio_encoder
        from livetalk_ray.models.text import build_text_encoder
        from livetalk_ray.models.vae import WanVAE

        self.cfg = cfg
        device = resolve_device(cfg.runtime)
        dtype = resolve_dtype(cfg.runtime, device)
        self.vae = WanVAE(cfg.vae, device=device, dtype=dtype, seed=TOY_INIT_SEED)
        self.audio = build_audio_encoder(cfg.audio, TOY_INIT_SEED, device=device, dtype=dtype)
        self.text = build_text_encoder(cfg.text, TOY_INIT_SEED, device=device, dtype=dtype)
        self.feature_dtype = np.dtype(cfg.data.feature_dtype)

    @torch.no_grad()
    def encode(self, clip: CuratedClip) -> dict:
        """One clip → the tensor columns of the shard schema (numpy)."""
        cfg = self.cfg
        video = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, T, H, W]
        latents = self.vae.encode(video)[0]
        ref = torch.from_numpy(clip.ref_image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        ref_latent = self.vae.encode(ref)[0]
        # Time-exact alignment, the same convention the streaming sampler uses for its audio windows.
        audio_features = self.audio.encode_timed(clip.audio, cfg.video.fps, cfg.data.num_frames)
        text = self.text.encode([clip.caption])[0]
        text_len = int(self.text.tokenize([clip.caption])[1].sum())
        as_np = lambda t: t.float().cpu().numpy().astype(self.feature_dtype)  # noqa: E731
        return {
            "latents": as_np(latents),
            "ref_latent": as_np(ref_latent),
            "audio_features": as_np(audio_features),
            "text_embedding": as_np(text),
            "text_len": text_len,
        }
