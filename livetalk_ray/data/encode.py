"""Encoders of the data pipeline: curated clip → VAE latents, wav2vec2 features, umT5 text embedding.

`ClipEncoder` loads the three frozen models once (the pipeline runs it as a Ray Data actor pool) and
encodes a batch of curated clips; it knows nothing of Ray.
"""

from __future__ import annotations

import numpy as np
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.curation import CuratedClip


class ClipEncoder:
    def __init__(self, cfg: LiveTalkConfig) -> None:
        from livetalk_ray.models.conditioning import build_conditioners

        self.cfg = cfg
        encoders = build_conditioners(cfg)
        self.vae, self.audio, self.text = encoders.vae, encoders.audio, encoders.text
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
        text, text_lens = self.text.encode_with_lengths(captions)

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
                    "text_len": text_lens[i],
                }
            )
        return out
