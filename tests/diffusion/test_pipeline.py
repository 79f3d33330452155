"""The streaming pipeline's two halves: denoising (`next_latents`, a Denoiser replica's job) then decoding
gives exactly what `next_block` gives in one process, with the audio cut under each block's frames."""

import numpy as np
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
