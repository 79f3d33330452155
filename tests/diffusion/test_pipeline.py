"""The streaming pipeline's two halves: denoising (`next_latents`, a Denoiser replica's job) then decoding
gives exactly what `next_block` gives in one process, with the audio cut under each block's frames."""

import pickle

import numpy as np
import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.diffusion.pipeline import AvatarPipeline
from livetalk_ray.models.image import tensor_to_uint8


def _stream(pipe, seconds=3.0):
    image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
    stream = pipe.open_stream(image, "A person talks.", seed=3)
    t = np.arange(int(seconds * 16000)) / 16000
    stream.push_audio((0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32))
    stream.finish_audio()
    return stream


def test_denoise_then_decode_equals_next_block():
    cfg = load_config("toy", overrides=["model.num_layers=2"])
    pipe = AvatarPipeline(cfg)
    whole, split = _stream(pipe), _stream(pipe)
    decoder = pipe.vae.stream()
    for k in range(3):
        block = whole.next_block()
        latent = split.next_latents()
        frames = tensor_to_uint8(decoder.decode_block(latent.latents)[0])
        assert latent.index == block.index == k
        assert latent.num_frames == cfg.block_video_frames(k) == len(frames) == len(block.frames)
        assert latent.first_frame == block.first_frame
        np.testing.assert_array_equal(frames, block.frames)
        np.testing.assert_array_equal(latent.audio, block.audio)
        assert len(latent.audio) == latent.num_frames * cfg.audio.sample_rate // cfg.video.fps
    assert cfg.block_video_frames(0) == 9 and cfg.block_video_frames(1) == 12  # 3 latent frames, 4 video frames each


def test_vae_decoder_tiny_decodes_the_same_latents_with_the_tiny_decoder():
    cfg = load_config("toy", overrides=["model.num_layers=2", "vae.decoder=tiny"])
    pipe = AvatarPipeline(cfg)
    assert type(pipe.frame_decoder).__name__ == "TinyVAEDecoder" and pipe.vae is not pipe.frame_decoder
    whole, split = _stream(pipe), _stream(pipe)
    decoder = pipe.frame_decoder.stream()
    for _ in range(2):
        block, latent = whole.next_block(), split.next_latents()
        np.testing.assert_array_equal(tensor_to_uint8(decoder.decode_block(latent.latents)[0]), block.frames)


def test_a_stream_moved_by_snapshot_makes_exactly_the_blocks_it_would_have_made():
    cfg = load_config("toy", overrides=["model.num_layers=2", "cache.sink_size=3", "cache.local_attn_size=9"])
    here, elsewhere = AvatarPipeline(cfg), AvatarPipeline(cfg)  # two replicas of one model
    t = np.arange(8 * 16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)
    staying, moving = (pipe.open_stream(image, "A person talks.", seed=3) for pipe in (here, here))
    for stream in (staying, moving):
        stream.push_audio(speech[: 3 * 16000])
    for _ in range(4):  # past the sinks and around the ring: anchors, evictions and positions all in the state
        assert torch.equal(staying.next_latents().latents, moving.next_latents().latents)
    snapshot = pickle.loads(pickle.dumps(moving.snapshot()))  # as Ray's object store carries it
    moved = elsewhere.restore_stream(snapshot)
    for stream in (staying, moved):  # audio keeps arriving after the move
        stream.push_audio(speech[3 * 16000 :])
    for _ in range(4):
        a, b = staying.next_latents(), moved.next_latents()
        assert (a.index, a.first_frame) == (b.index, b.first_frame)
        assert torch.equal(a.latents, b.latents)
        np.testing.assert_array_equal(a.audio, b.audio)


def test_a_snapshot_from_another_model_is_refused_with_the_reason():
    small = AvatarPipeline(load_config("toy", overrides=["model.num_layers=2"]))
    image = torch.zeros(3, 64, 64)
    snapshot = small.open_stream(image, "A person talks.").snapshot()
    other = AvatarPipeline(load_config("toy", overrides=["model.num_layers=3"]))
    with pytest.raises(ValueError, match="does not fit"):
        other.restore_stream(snapshot)
    with pytest.raises(ValueError, match="format"):
        small.restore_stream({**snapshot, "format": 99})
