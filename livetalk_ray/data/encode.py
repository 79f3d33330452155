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
    def encode(self, clips: list[CuratedClip]) -> list[dict]:
        """Clips → the tensor columns of the shard schema (numpy), one dict per clip.

        The VAE runs once over the whole batch (its per-frame Python loop dominates at small sizes);
        every clip has the same frame count and resolution, so they stack."""
        cfg = self.cfg
        video = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        latents = self.vae.encode(video)  # [B, z, F_lat, h, w]
        refs = torch.from_numpy(np.stack([c.ref_image for c in clips])).permute(0, 3, 1, 2)[:, :, None]
        ref_latents = self.vae.encode(refs.float() / 127.5 - 1)
        captions = [c.caption for c in clips]
        text = self.text.encode(captions)
        text_lens = self.text.tokenize(captions)[1].sum(dim=1).tolist()

        def as_np(t: torch.Tensor) -> np.ndarray:
            return t.float().cpu().numpy().astype(self.feature_dtype)

        out = []
        for i, clip in enumerate(clips):
            # Time-exact alignment, the same convention the streaming sampler uses for its audio windows.
            audio_features = self.audio.encode_timed(clip.audio, cfg.video.fps, cfg.data.num_frames)
            out.append(
                {
                    "latents": as_np(latents[i]),
                    "ref_latent": as_np(ref_latents[i]),
                    "audio_features": as_np(audio_features),
                    "text_embedding": as_np(text[i]),
                    "text_len": int(text_lens[i]),
                }
            )
        return out
