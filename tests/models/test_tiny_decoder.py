"""The tiny streaming decoder: streaming equals whole-clip decoding, batched streams equal each alone, and a
TAEHV-format file (written here in TAEHV's own key layout, with its encoder and an old-style TGrow) imports."""

import pytest
import torch

from livetalk_ray.models.tiny_decoder import (
    TinyDecoder,
    TinyDecoderError,
    TinyVAEDecoder,
    decode_many_tiny,
    load_taehv,
    save_taehv,
)

WIDTHS = (16, 8, 8, 8)


def tiny(seed=0, widths=WIDTHS) -> TinyVAEDecoder:
    torch.manual_seed(seed)
    model = TinyDecoder(latent_channels=4, widths=widths)
    mean, std = torch.linspace(-0.5, 0.5, 4).view(1, 4, 1, 1, 1), torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1, 1)
    return TinyVAEDecoder(model, mean, std)


def latents(frames, batch=1, seed=1):
    return torch.randn(batch, 4, frames, 3, 5, generator=torch.Generator().manual_seed(seed))


def test_streaming_decode_equals_whole_clip():
    decoder, z = tiny(), latents(9)
    whole = decoder.decode(z)
    assert whole.shape == (1, 3, 33, 24, 40)  # 1 + 4(F - 1) frames, 8x the latent size, like the Wan VAE
    assert -1 <= whole.min() and whole.max() <= 1 and whole.std() > 0
    stream = decoder.stream()
    parts = [stream.decode_block(z[:, :, s : s + 3]) for s in range(0, 9, 3)]
    assert [p.shape[2] for p in parts] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=0)


def test_memory_matters_and_streams_do_not_share_it():
    decoder, a, b = tiny(), latents(6, seed=2), latents(6, seed=3)
    sa, sb = decoder.stream(), decoder.stream()
    sa.decode_block(a[:, :, :3])
    sb.decode_block(b[:, :, :3])
    torch.testing.assert_close(sa.decode_block(a[:, :, 3:]), decoder.decode(a)[:, :, 9:], atol=1e-5, rtol=0)
    fresh = decoder.stream()
    fresh.frames_in = 3  # the same latents without the memory of the block before: other frames
    assert (fresh.decode_block(a[:, :, 3:]) - decoder.decode(a)[:, :, 9:]).abs().max() > 1e-3


def test_batched_streams_equal_each_stream_alone():
    decoder = tiny()
    clips = [latents(6, seed=s) for s in (4, 5, 6)]
    alone = [decoder.decode(z) for z in clips]
    streams = [decoder.stream() for _ in clips]
    # Streams 0 and 1 start together; stream 2 starts one block later, beside their second blocks.
    first = decode_many_tiny(streams[:2], [z[:, :, :3] for z in clips[:2]])
    late = decode_many_tiny([streams[2]], [clips[2][:, :, :3]])
    second = decode_many_tiny(streams[:2], [z[:, :, 3:] for z in clips[:2]])
    last = decode_many_tiny([streams[2]], [clips[2][:, :, 3:]])
    got = [torch.cat([f, s], 2) for f, s in zip(first, second, strict=True)] + [torch.cat([late[0], last[0]], 2)]
    for video, reference in zip(got, alone, strict=True):
        torch.testing.assert_close(video, reference, atol=1e-5, rtol=0)


def taehv_file_state(widths=WIDTHS, latent_channels=4, seed=7) -> dict[str, torch.Tensor]:
    """A state dict in TAEHV's own layout (taehv.py, the base decoder), written out from its layer list: an
    encoder, and stage 0's TGrow as older files keep it (2x wide although that stage does not upscale)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    n = widths
    state = {"encoder.0.weight": w(64, 3, 3, 3), "encoder.0.bias": w(64)}
    state |= {"decoder.1.weight": w(n[0], latent_channels, 3, 3), "decoder.1.bias": w(n[0])}
    for stage, (first_mem, grow, conv) in enumerate(((3, 7, 8), (9, 13, 14), (15, 19, 20))):
        c = n[stage]
        for i in range(first_mem, first_mem + 3):
            for j, c_in in ((0, 2 * c), (2, c), (4, c)):
                state |= {f"decoder.{i}.conv.{j}.weight": w(c, c_in, 3, 3), f"decoder.{i}.conv.{j}.bias": w(c)}
        state[f"decoder.{grow}.conv.weight"] = w(2 * c, c, 1, 1)  # 2x wide: stage 0 is stride 1 (old files)
        state[f"decoder.{conv}.weight"] = w(n[stage + 1], c, 3, 3)
    state |= {"decoder.22.weight": w(3, n[3], 3, 3), "decoder.22.bias": w(3)}
    return state


def test_a_taehv_file_imports_with_a_report(tmp_path):
    from safetensors.torch import save_file

    state = taehv_file_state()
    save_file(state, str(tmp_path / "taew.safetensors"))
    model, report = load_taehv(tmp_path / "taew.safetensors")
    assert model.widths == WIDTHS and model.latent_channels == 4 and model.temporal_factor == 4
    assert "decoder.1.weight 16x4x3x3" in report and report[-1].startswith("ignored: 2 tensors")
    own = model.state_dict()
    assert torch.equal(own["decoder.7.conv.weight"], state["decoder.7.conv.weight"][-16:])  # the last step's rows
    assert torch.equal(own["decoder.13.conv.weight"], state["decoder.13.conv.weight"])  # a real 2x TGrow
    assert all(torch.equal(own[k], state[k]) for k in own if k not in ("decoder.7.conv.weight",))
    save_taehv(model, tmp_path / "again.safetensors")  # and back: the same decoder
    again, _ = load_taehv(tmp_path / "again.safetensors")
    z = latents(3)
    decoder = TinyVAEDecoder(model, torch.zeros(1, 4, 1, 1, 1), torch.ones(1, 4, 1, 1, 1))
    torch.testing.assert_close(decoder.decode(z), TinyVAEDecoder(again, decoder.mean, decoder.std).decode(z))


def test_bad_tiny_decoder_files_are_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(TinyDecoderError, match="not found"):
        load_taehv(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TinyDecoderError, match="cannot read"):
        load_taehv(tmp_path / "junk.safetensors")
    save_file({"encoder.0.weight": torch.zeros(1)}, str(tmp_path / "encoder_only.safetensors"))
    with pytest.raises(TinyDecoderError, match="not a TAEHV decoder"):
        load_taehv(tmp_path / "encoder_only.safetensors")
    broken = taehv_file_state()
    del broken["decoder.22.bias"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(TinyDecoderError, match="missing \\['decoder.22.bias'\\]"):
        load_taehv(tmp_path / "broken.safetensors")


def test_vae_decoder_setting_selects_the_tiny_decoder_with_the_vaes_statistics(tmp_path):
    from livetalk_ray.assets import TOY_DIR
    from livetalk_ray.config import load_config
    from livetalk_ray.models.tiny_decoder import TinyDecodeStream
    from livetalk_ray.models.vae import WanVAE, decode_many, frame_decoder

    cfg = load_config("toy", overrides=[f"vae.path={TOY_DIR / 'vae'}"])
    assert isinstance(frame_decoder(cfg.vae), WanVAE)  # vae.decoder=full, the default
    torch.manual_seed(3)
    save_taehv(TinyDecoder(cfg.vae.z_dim, (16, 8, 8, 8)), tmp_path / "tiny.safetensors")
    cfg.vae.decoder, cfg.vae.tiny.path = "tiny", str(tmp_path / "tiny.safetensors")
    decoder = frame_decoder(cfg.vae)
    assert isinstance(decoder, TinyVAEDecoder) and decoder.model.widths == (16, 8, 8, 8)  # the file's own widths
    full = WanVAE(cfg.vae)  # the statistics come from the VAE directory's config, without its weights
    assert torch.equal(decoder.mean, full.mean) and torch.equal(decoder.std, full.std)
    z = torch.randn(2, cfg.vae.z_dim, 3, cfg.latent_height, cfg.latent_width)
    streams = [decoder.stream(), decoder.stream()]
    assert isinstance(streams[0], TinyDecodeStream)
    batched = decode_many(streams, [z[:1], z[1:]])  # the serving path: one call for every session
    torch.testing.assert_close(torch.cat(batched), decoder.decode(z), atol=1e-5, rtol=0)
    assert decoder.decode_frames(z).shape == (2, 9, cfg.video.height, cfg.video.width, 3)
