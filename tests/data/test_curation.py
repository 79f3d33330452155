import numpy as np
import pytest

from livetalk_ray.config import load_config
from livetalk_ray.data.curation import Rejected, av_offset, curate, normalise_caption, prepare_clip, probe
from livetalk_ray.data.sources import ClipSource

from .conftest import write_portrait_clip


@pytest.fixture(scope="module")
def cfg():
    return load_config("toy")


def moving_clip(t=33, size=64, seed=0):
    """Textured frames that change every frame, and speech-like audio: passes every rule."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(40, 220, (t, size, size, 3)).astype(np.uint8)
    audio = (0.1 * rng.standard_normal(t * 1000)).astype(np.float32)
    return frames, audio


def reason(fn, *args):
    with pytest.raises(Rejected) as info:
        fn(*args)
    return info.value.reason


def test_clean_clip_passes(cfg):
    quality = curate(*moving_clip(), cfg)
    assert quality["black_fraction"] == 0 and quality["sharpness"] > cfg.data.blur_min_laplacian_var


def test_each_rule_names_its_reason(cfg):
    frames, audio = moving_clip()
    assert reason(curate, np.zeros_like(frames) + 3, audio, cfg) == "black_frames"
    assert reason(curate, np.repeat(frames[:1], len(frames), 0), audio, cfg) == "frozen_frames"
    smooth = np.broadcast_to(np.linspace(60, 150, 64)[None, None, :, None], frames.shape)
    drift = smooth + np.arange(len(frames))[:, None, None, None] * 2  # changes, but has no edges at all
    assert reason(curate, drift.astype(np.uint8), audio, cfg) == "blurry"
    assert reason(curate, frames, audio * 1e-4, cfg) == "silence"


def test_av_offset_detects_a_shift(cfg):
    """A dark mouth whose height follows the speech envelope, then delayed: the offset is found and rejected."""
    rng = np.random.default_rng(1)
    t = 65
    envelope = np.abs(np.convolve(rng.standard_normal(t + 20), np.ones(3) / 3, "same"))[:t]
    audio = (rng.standard_normal((t, 1000)) * envelope[:, None]).astype(np.float32).ravel()
    frames = np.full((t, 64, 64, 3), 160, np.uint8)
    frames[:, ::2, ::2] = 130  # texture, so the clip is not "blurry"
    height = np.round(envelope / envelope.max() * 12).astype(int)
    for shift, expect_reject in ((0, False), (6, True)):
        moved = frames.copy()
        delayed = np.concatenate([np.full(shift, height[0]), height])[:t]
        for k, rows in enumerate(delayed):
            moved[k, 40 : 40 + rows, 24:40] = 20
        lag, corr, _ = av_offset(moved.mean(-1), audio)
        assert lag == shift and corr > 0.8
        if expect_reject:
            assert reason(curate, moved, audio, cfg) == "av_offset"
        else:
            assert curate(moved, audio, cfg)["av_lag_frames"] == 0


def test_caption_rules():
    out = normalise_caption("https://x.y #vlog A man in a red shirt. He is outdoors. It is sunny. 4K")
    assert out.startswith("A man in a red shirt. He is outdoors.") and "http" not in out and "#" not in out
    assert "talk" in out  # a motion-focused prompt says the person talks
    assert normalise_caption("A woman is speaking to us") == "A woman is speaking to us."


def test_probe_limits(cfg, portrait, speech, tmp_path):
    video = str(write_portrait_clip(portrait, speech, tmp_path, size=96))
    assert probe(video, cfg).fps == pytest.approx(16)
    tiny_limit = cfg.model_copy(deep=True)
    tiny_limit.data.max_frame_pixels = 64 * 64
    assert reason(probe, video, tiny_limit) == "resolution_too_large"
    strict = cfg.model_copy(deep=True)
    strict.data.min_fps = 24
    assert reason(probe, video, strict) == "fps_out_of_range"
    long = cfg.model_copy(deep=True)
    long.data.num_frames = 81
    assert reason(probe, video, long) == "too_short"


def test_prepare_clip_on_a_real_portrait_and_speech(cfg, portrait, speech, tmp_path):
    video = write_portrait_clip(portrait, speech, tmp_path)
    clip = prepare_clip(ClipSource("p", "p.mp4", video=str(video), caption_file=str(video.with_suffix(".json"))), cfg)
    assert clip.frames.shape == (33, 64, 64, 3) and clip.audio.shape == (33000,)
    assert clip.ref_source == "sharpest_frame" and clip.ref_image.shape == (64, 64, 3)
    assert "4K" not in clip.caption and "talk" in clip.caption
    with pytest.raises(Rejected, match="missing_caption"):
        prepare_clip(ClipSource("p", "p.mp4", video=str(video)), cfg)
