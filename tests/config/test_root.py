"""LiveTalkConfig: derived sizes and frame arithmetic (livetalk_ray/config/root.py)."""

import pytest
import yaml

from livetalk_ray.config import ConfigError, LiveTalkConfig, load_config


def test_derived_sizes():
    toy = load_config("toy")
    assert (toy.latent_height, toy.tokens_per_frame) == (8, 16)
    real = load_config("wan-1.3b")
    assert (real.latent_height, real.tokens_per_frame) == (64, 1024)


def test_every_default_is_the_1_3b_student():
    assert LiveTalkConfig(preset="wan-1.3b").model.num_layers == 30
    assert load_config("wan-1.3b") == LiveTalkConfig(preset="wan-1.3b")


def test_frame_arithmetic_lives_on_the_config():
    """One rule for every frame count: the causal VAE's first latent frame is one video frame, later ones 4."""
    cfg = load_config("toy")
    assert cfg.block_video_frames(0) == 9 and cfg.block_video_frames(1) == 12
    assert cfg.video_frames(4, at_start=False) == 16 and cfg.video_frames(4, at_start=True) == 13
    assert cfg.latent_frames(33) == 9 == cfg.clip_latent_frames and cfg.latent_frames(36) == 9
    assert cfg.block_seconds == 12 / 16
    for frames in range(1, 200):  # the fewest blocks whose frames reach `frames`
        n = cfg.blocks_for_video_frames(frames)
        made = sum(cfg.block_video_frames(k) for k in range(n))
        assert made >= frames and made - cfg.block_video_frames(n - 1) < frames


def test_model_interface_sizes_are_derived_from_the_vae_and_encoders(tmp_path):
    """in/out/text/audio sizes of the DiT are set in one place each: the VAE and encoder sections."""
    cfg = load_config("toy", overrides=["text.d_model=48", "audio.num_hidden_layers=3", "vae.z_dim=8"])
    m = cfg.model
    assert (m.text_dim, m.audio_feature_dim, m.in_dim, m.out_dim) == (48, 32 * 5, 17, 8)
    assert m.audio_frames_per_latent == cfg.vae.temporal_factor == 4
    assert (
        load_config("toy", overrides=["vae.temperal_downsample=[false,false,true]"]).model.audio_frames_per_latent == 2
    )
    cfg.save(tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]
    assert not {"text_dim", "audio_feature_dim", "in_dim", "out_dim", "audio_frames_per_latent"} & set(saved)
    assert load_config(config_file=tmp_path / "c.yaml") == cfg
    assert load_config("toy", overrides=["model.text_dim=64"]).model.text_dim == 64  # agreeing is fine
    with pytest.raises(ConfigError, match=r"model.text_dim=10 disagrees with text.d_model \(64\).*set text.d_model"):
        load_config("toy", overrides=["model.text_dim=10"])
