"""Whole clips from shard rows: conditions, and the one rollout loop that ODE, DMD and eval share."""

import torch

from livetalk_ray.diffusion.clips import CONDITION_COLUMNS, conditions, rollout, sample_stream
from livetalk_ray.models.dit import WanDiT


def batch_of(cfg, b: int = 2) -> dict:
    return {
        "ref_latent": torch.randn(b, cfg.vae.z_dim, 1, cfg.latent_height, cfg.latent_width),
        "text_embedding": torch.randn(b, cfg.text.max_length, cfg.model.text_dim),
        "audio_features": torch.randn(b, cfg.data.num_frames, cfg.model.audio_feature_dim),
    }


def test_conditions_of_a_batch(tiny_cfg):
    batch = batch_of(tiny_cfg)
    assert sorted(batch) == sorted(CONDITION_COLUMNS)
    ref, text, audio = conditions(batch, tiny_cfg, "cpu", torch.float32)
    assert ref.shape == batch["ref_latent"].shape and text.shape == batch["text_embedding"].shape
    assert audio.shape == (2, tiny_cfg.clip_latent_frames, 4, tiny_cfg.model.audio_feature_dim)


def test_sampled_streams_are_full_rollouts_and_exit_steps_stop_early(tiny_cfg):
    model = WanDiT(tiny_cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    batch = batch_of(tiny_cfg)
    with torch.no_grad():
        full = sample_stream(model, tiny_cfg, batch, seed=5)
        again = rollout(model, tiny_cfg, *conditions(batch, tiny_cfg, "cpu", torch.float32), seed=5)
        early = rollout(model, tiny_cfg, *conditions(batch, tiny_cfg, "cpu", torch.float32), seed=5, exit_step=0)
    assert full.shape == (2, tiny_cfg.vae.z_dim, tiny_cfg.clip_latent_frames, *full.shape[-2:])
    assert torch.equal(full, again)
    assert not torch.allclose(full[:, :, 1:], early[:, :, 1:])
    assert torch.equal(full[:, :, :1], batch["ref_latent"])  # the reference frame is given, not generated
