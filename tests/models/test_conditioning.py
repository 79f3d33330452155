"""The unconditional text of teacher CFG: zeros for the toy, the encoded negative prompt for real presets."""

import pytest
import torch

from livetalk_ray.config import TOY_INIT_SEED, WAN_NEGATIVE_PROMPT, load_config
from livetalk_ray.diffusion.clips import sample_clips
from livetalk_ray.diffusion.sampler import sample_teacher
from livetalk_ray.models import conditioning
from livetalk_ray.models.conditioning import negative_text
from livetalk_ray.models.dit import WanDiT, group_audio_frames
from livetalk_ray.models.text import build_text_encoder

# The wan-1.3b preset with a tiny text encoder and DiT, so the real-preset path runs on CPU.
TINY_WAN = [
    "text.d_model=64",
    "text.num_layers=2",
    "text.num_heads=2",
    "text.d_ff=128",
    "text.max_length=32",
    "model.text_dim=64",
    "model.dim=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.ffn_dim=64",
    "model.audio_feature_dim=32",
    "audio.hidden_size=8",
    "audio.num_hidden_layers=2",
    "audio.num_attention_heads=2",
    "audio.intermediate_size=16",
    "video.height=32",
    "video.width=32",
    "data.num_frames=9",
    "sampler.teacher_steps=2",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVETALK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(conditioning, "_NEGATIVE_TEXT", {})
    return tmp_path


def test_toy_negative_text_is_zeros(cache):
    cfg = load_config("toy")
    neg = negative_text(cfg, "cpu", torch.float32)
    assert neg.shape == (1, cfg.text.max_length, cfg.model.text_dim) and not neg.any()
    assert not any(cache.iterdir())  # nothing to encode, nothing cached


def test_real_preset_negative_text_is_the_encoded_wan_prompt_once(cache):
    cfg = load_config("wan-1.3b", overrides=TINY_WAN)
    assert cfg.sampler.negative_prompt == WAN_NEGATIVE_PROMPT
    neg = negative_text(cfg, "cpu", torch.float32)
    expected = build_text_encoder(cfg.text, TOY_INIT_SEED).encode([WAN_NEGATIVE_PROMPT])
    assert torch.allclose(neg, expected, atol=1e-6) and neg.abs().sum() > 0
    (stored,) = (cache / "negative_prompts").iterdir()
    stamp = stored.stat().st_mtime_ns
    conditioning._NEGATIVE_TEXT.clear()  # a new process on the same node reads the file instead of encoding
    assert torch.equal(negative_text(cfg, "cpu", torch.float32), neg)
    assert stored.stat().st_mtime_ns == stamp
    other = load_config("wan-1.3b", overrides=[*TINY_WAN, "sampler.negative_prompt=blurry"])
    assert not torch.allclose(negative_text(other, "cpu", torch.float32), neg)


def test_teacher_samples_use_the_negative_prompt_on_real_presets(cache):
    cfg = load_config("wan-1.3b", overrides=TINY_WAN)
    model = WanDiT(cfg.model, causal=False).eval()
    for p in model.parameters():  # a random teacher whose text branch matters (the head starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    lat = (cfg.data.num_frames - 1) // 4 + 1
    batch = {
        "ref_latent": torch.randn(1, 16, 1, cfg.latent_height, cfg.latent_width),
        "text_embedding": torch.randn(1, cfg.text.max_length, cfg.model.text_dim),
        "audio_features": torch.randn(1, cfg.data.num_frames, cfg.model.audio_feature_dim),
    }
    got = sample_clips(model, cfg, batch, seed=3)
    noise = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    ref, text = batch["ref_latent"], batch["text_embedding"]
    audio = batch["audio_features"]
    grouped = group_audio_frames(audio)
    with_negative, _ = sample_teacher(model, cfg, noise, ref, text, negative_text(cfg, "cpu", torch.float32), grouped)
    with_zeros, _ = sample_teacher(model, cfg, noise, ref, text, torch.zeros_like(text), grouped)
    assert got.shape[2] == lat
    assert torch.allclose(got, with_negative, atol=1e-5)
    assert not torch.allclose(got, with_zeros, atol=1e-3)
