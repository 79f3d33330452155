import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.vae import VAEError, WanVAE, decode_many


@pytest.fixture(scope="module")
def vae():
    from livetalk_ray.config import load_config

    return WanVAE(load_config("toy").vae)


def latents_of(frames):
    from livetalk_ray.config import load_config

    cfg = load_config("toy")
    return torch.randn(1, cfg.vae.z_dim, frames, cfg.latent_height, cfg.latent_width)


def test_streaming_decode_equals_whole_clip(vae):
    latents = latents_of(9)
    whole = vae.decode(latents)
    stream = vae.stream()
    parts = [stream.decode_block(latents[:, :, s : s + 3]) for s in range(0, 9, 3)]
    assert [p.shape[2] for p in parts] == [9, 12, 12]  # 1 + 4(F-1) frames in all
    assert torch.allclose(torch.cat(parts, 2), whole, atol=1e-5)
    assert whole.abs().max() > 0


def test_two_streams_do_not_share_state(vae):
    a, b = latents_of(6), latents_of(6)
    sa, sb = vae.stream(), vae.stream()
    sa.decode_block(a[:, :, :3])
    sb.decode_block(b[:, :, :3])
    assert torch.allclose(sa.decode_block(a[:, :, 3:]), vae.decode(a)[:, :, 9:], atol=1e-5)


def test_batched_decode_equals_each_stream_alone(vae):
    """Three streams decoded together, one of them joining at its first block (which decodes alone)."""
    clips = [latents_of(9) for _ in range(3)]
    wholes = [vae.decode(c) for c in clips]
    streams = [vae.stream() for _ in range(3)]
    parts: list[list[torch.Tensor]] = [[], [], []]
    for b in range(4):  # stream 2 starts one block late
        live = [i for i in range(3) if b - (i == 2) in range(3)]
        blocks = [clips[i][:, :, 3 * (b - (i == 2)) :][:, :, :3] for i in live]
        for i, out in zip(live, decode_many([streams[i] for i in live], blocks), strict=True):
            parts[i].append(out)
    for i in range(3):
        assert torch.allclose(torch.cat(parts[i], 2), wholes[i], atol=1e-4), i
        assert streams[i].frames_in == 9


def test_encode_shape_and_frame_rule(vae):
    assert vae.encode(torch.rand(1, 3, 17, 64, 64) * 2 - 1).shape == latents_of(5).shape
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 4, 64, 64))


def test_bad_path_is_a_clear_error(tmp_path):
    from livetalk_ray.config import load_config

    cfg = load_config("toy").vae
    with pytest.raises(VAEError, match="not found"):
        WanVAE(cfg.model_copy(update={"path": str(tmp_path / "missing.pth")}))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(VAEError, match="cannot read"):
        WanVAE(cfg.model_copy(update={"path": str(junk)}))


def test_loads_a_local_diffusers_directory(vae, tmp_path):
    from livetalk_ray.config import load_config

    vae.model.save_pretrained(tmp_path / "root" / "vae")
    cfg = load_config("toy").vae.model_copy(update={"path": str(tmp_path / "root")})
    loaded = WanVAE(cfg)
    latents = latents_of(3)
    assert torch.equal(loaded.decode(latents), vae.decode(latents))


def test_chunked_encode_equals_whole_clip_encode(vae):
    from livetalk_ray.models.vae import encode_chunk, new_cache

    model = vae.model
    video = torch.rand(2, 3, 17, 64, 64) * 2 - 1
    whole = model.quant_conv(model.encoder(video[:, :, :1], feat_cache=new_cache(model, "encoder"), feat_idx=[0]))
    with torch.no_grad():
        reference = model.encode(video).latent_dist.parameters
        cache = new_cache(model, "encoder")
        parts = [encode_chunk(model, video[:, :, :9], cache, 0), encode_chunk(model, video[:, :, 9:], cache, 9)]
    assert [p.shape[2] for p in parts] == [3, 2]  # 1 + 4 + 4 frames → 3 latents, then 8 → 2
    assert torch.allclose(torch.cat(parts, 2), reference, atol=1e-5)
    assert torch.allclose(whole, reference[:, :, :1], atol=1e-5)


def test_chunks_train_through_the_current_chunk_only(vae):
    from livetalk_ray.models.vae import decode_chunk, detach_cache, new_cache

    model = vae.model
    cache = new_cache(model, "decoder")
    z = torch.randn(1, 16, 2, 8, 8, requires_grad=True)
    decode_chunk(model, z, cache, 0).sum()  # the cache now holds features of z
    assert any(torch.is_tensor(c) and c.requires_grad for c in cache)
    cut = detach_cache(cache)
    assert not any(torch.is_tensor(c) and c.requires_grad for c in cut)
    assert all(torch.equal(a, b) for a, b in zip(cache, cut, strict=True) if torch.is_tensor(a))


def test_patchified_vae_streams_like_its_whole_clip_paths():
    """Wan 2.2-style pixel patchify (`vae.patch_size`, one spatial downsample fewer, a wider decoder): chunked
    encode and streamed decode still equal diffusers' whole-clip encode and decode."""
    from livetalk_ray.models.vae import decode_chunk, encode_chunk, new_cache

    cfg = load_config(
        "toy",
        overrides=[
            "vae.patch_size=2",
            "vae.dim_mult=[1,2,2]",
            "vae.temperal_downsample=[true,true]",
            "vae.decoder_base_dim=24",
        ],
    )
    assert cfg.vae.spatial_factor == 8 and cfg.latent_height == 8
    model = WanVAE(cfg.vae).model
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        moments = model.encode(video).latent_dist.parameters
        cache = new_cache(model, "encoder")
        parts = [encode_chunk(model, video[:, :, :5], cache, 0), encode_chunk(model, video[:, :, 5:], cache, 5)]
        assert torch.allclose(torch.cat(parts, 2), moments, atol=1e-5)
        z = moments[:, :16]
        whole = model.decode(z).sample
        cache = new_cache(model, "decoder")
        streamed = torch.cat(
            [decode_chunk(model, z[:, :, :2], cache, 0), decode_chunk(model, z[:, :, 2:], cache, 2)], 2
        )
    assert streamed.shape == video.shape
    assert torch.allclose(streamed.clamp(-1, 1), whole, atol=1e-5)


def test_decode_frames_gives_the_decoded_clips_as_uint8(vae):
    from livetalk_ray.models.image import tensor_to_uint8

    latents = latents_of(3).repeat(2, 1, 1, 1, 1)
    frames = vae.decode_frames(latents)
    video = vae.decode(latents)
    assert frames.shape == (2, 9, *video.shape[3:], 3)
    assert (frames[1] == tensor_to_uint8(video[1])).all()
