import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.dit import WanDiT, block_causal_mask, group_audio_frames, rope_axis_dims


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Wan zero-initialises the head; random weights everywhere make equivalence tests meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def inputs(cfg, frames: int, batch: int = 1):
    h, w = cfg.latent_height, cfg.latent_width
    return dict(
        x=torch.randn(batch, cfg.model.out_dim, frames, h, w),
        t=torch.rand(batch, frames) * 1000,
        context=torch.randn(batch, cfg.text.max_length, cfg.model.text_dim),
        y=torch.randn(batch, cfg.model.in_dim - cfg.model.out_dim, frames, h, w),
        audio=torch.randn(batch, frames, cfg.model.audio_frames_per_latent, cfg.model.audio_feature_dim),
    )


def test_wan_1_3b_layout_on_meta_device():
    cfg = load_config("wan-1.3b")
    with torch.device("meta"):
        model = WanDiT(cfg.model)
    state = model.state_dict()
    assert len(state) == 857
    assert sum(t.numel() for t in state.values()) == 1_421_187_232
    assert all(t.is_meta for t in state.values())
    assert list(model.buffers()) == []
    assert state["patch_embedding.weight"].shape == (1536, 33, 1, 2, 2)
    assert state["head.modulation"].shape == (1, 2, 1536)
    assert state["blocks.0.modulation"].shape == (1, 6, 1536)
    assert state["audio_proj.proj.weight"].shape == (32, 43008)
    assert state["time_projection.1.weight"].shape == (9216, 1536)
    assert state["text_embedding.0.weight"].shape == (1536, 4096)
    assert state["blocks.29.self_attn.norm_q.weight"].shape == (1536,)
    assert state["blocks.3.norm3.weight"].shape == (1536,)
    assert "blocks.3.norm1.weight" not in state  # LN1/LN2 have no affine parameters
    assert state["audio_cond_projs.13.weight"].shape == (1536, 32)  # 14 projections: blocks 2..15
    assert "audio_cond_projs.14.weight" not in state


def test_wan_14b_sizes():
    cfg = load_config("wan-14b")
    with torch.device("meta"):
        model = WanDiT(cfg.model)
    state = model.state_dict()
    assert state["blocks.39.ffn.0.weight"].shape == (13824, 5120)
    assert sum(k.startswith("audio_cond_projs") for k in state) == 2 * 19


def test_rope_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert sum(rope_axis_dims(32)) == 32


@pytest.mark.parametrize("sink", [0, 3, 6, 9])
@pytest.mark.parametrize("mode", ["absolute", "rebased"])
def test_cached_blocks_equal_masked_forward(toy_cfg, sink, mode):
    model = randomize(WanDiT(toy_cfg.model))
    frames = 15  # five blocks: the 15-frame window is filled but not exceeded
    inp = inputs(toy_cfg, frames)
    with torch.no_grad():
        full = model(**inp)
        cache = model.new_cache(1, toy_cfg.tokens_per_frame, 15, sink, position_mode=mode)
        blocks = []
        for s in range(0, frames, 3):
            sl = slice(s, s + 3)
            blocks.append(
                model.forward_cached(
                    inp["x"][:, :, sl],
                    inp["t"][:, sl],
                    inp["context"],
                    inp["y"][:, :, sl],
                    cache,
                    s,
                    inp["audio"][:, sl],
                )
            )
    assert (torch.cat(blocks, 2) - full).abs().max() < 1e-4
    assert full.abs().max() > 0.1  # the comparison is not between zeros


def stream(model, cfg, inp, window: int, sink: int, mode: str) -> list[torch.Tensor]:
    cache = model.new_cache(1, cfg.tokens_per_frame, window, sink, position_mode=mode)
    out = []
    with torch.no_grad():
        for s in range(0, inp["x"].shape[2], 3):
            sl = slice(s, s + 3)
            args = (inp["x"][:, :, sl], inp["t"][:, sl], inp["context"], inp["y"][:, :, sl])
            out.append(model.forward_cached(*args, cache, s, inp["audio"][:, sl]))
            out.append(model.forward_cached(*args, cache, s, inp["audio"][:, sl]))  # a rerun reads the same
    return out


def test_rebased_keys_keep_their_distances_through_evictions(toy_cfg):
    """Without sinks every cached frame is a recent one, so renumbering the window leaves every query-key
    distance as it is: `rebased` must give the `absolute` stream exactly, block after block, however many
    evictions have moved the stored keys back in time."""
    model = randomize(WanDiT(toy_cfg.model))
    with torch.no_grad():  # sharp attention, so that a key turned to the wrong time shows in the output
        for block in model.blocks:
            block.self_attn.norm_q.weight.fill_(4.0)
            block.self_attn.norm_k.weight.fill_(4.0)
    inp = inputs(toy_cfg, 24)  # 8 blocks through a 9-frame window: 5 evictions
    absolute = stream(model, toy_cfg, inp, 9, 0, "absolute")
    rebased = stream(model, toy_cfg, inp, 9, 0, "rebased")
    for i, (a, r) in enumerate(zip(absolute, rebased, strict=True)):
        assert (a - r).abs().max() < 1e-5 * a.abs().max(), f"call {i}"
    with_sinks = stream(model, toy_cfg, inp, 9, 3, "rebased")  # the sinks' distances do change
    assert (with_sinks[-1] - absolute[-1]).abs().max() > 1e-3 * absolute[-1].abs().max()


def test_block_causality_and_bidirectionality(toy_cfg):
    causal = randomize(WanDiT(toy_cfg.model))
    bidir = WanDiT(toy_cfg.model, causal=False)
    bidir.load_state_dict(causal.state_dict())
    inp = inputs(toy_cfg, 9)
    changed = {**inp, "x": inp["x"].clone()}
    changed["x"][:, :, 6:] += 1.0  # perturb the last block only
    with torch.no_grad():
        c0, c1 = causal(**inp), causal(**changed)
        b0, b1 = bidir.eval()(**inp), bidir(**changed)
    assert torch.allclose(c0[:, :, :6], c1[:, :, :6], atol=1e-6)  # earlier blocks cannot see the future
    assert not torch.allclose(c0[:, :, 6:], c1[:, :, 6:])
    assert not torch.allclose(b0[:, :, :6], b1[:, :, :6])  # the teacher sees the whole clip


def test_audio_and_text_change_the_output(toy_cfg):
    model = randomize(WanDiT(toy_cfg.model))
    inp = inputs(toy_cfg, 3)
    with torch.no_grad():
        base = model(**inp)
        no_audio = model(**{**inp, "audio": None})
        other_text = model(**{**inp, "context": torch.randn_like(inp["context"])})
    assert not torch.allclose(base, no_audio)
    assert not torch.allclose(base, other_text)


def test_cached_forward_carries_gradient_to_the_current_block(toy_cfg):
    model = randomize(WanDiT(toy_cfg.model)).train()
    inp = inputs(toy_cfg, 6)
    cache = model.new_cache(1, toy_cfg.tokens_per_frame, 15, 0)
    with torch.no_grad():
        model.forward_cached(inp["x"][:, :, :3], inp["t"][:, :3], inp["context"], inp["y"][:, :, :3], cache, 0)
    out = model.forward_cached(inp["x"][:, :, 3:], inp["t"][:, 3:], inp["context"], inp["y"][:, :, 3:], cache, 3)
    out.square().mean().backward()
    assert model.blocks[0].self_attn.k.weight.grad.abs().sum() > 0


def test_block_causal_mask_shape():
    mask = block_causal_mask(6, 3, 2, "cpu")
    assert mask.shape == (12, 12)
    assert mask[0, 5] and not mask[0, 6] and mask[11, 0]


def test_group_audio_frames_repeats_frame_zero():
    feats = torch.arange(9.0).view(1, 9, 1)
    grouped = group_audio_frames(feats)
    assert grouped.shape == (1, 3, 4, 1)
    assert grouped[0, 0, :, 0].tolist() == [0, 0, 0, 0]
    assert grouped[0, 1, :, 0].tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        group_audio_frames(torch.zeros(1, 8, 1))


def test_cached_forward_of_many_streams_equals_each_alone(toy_cfg):
    """Two streams with differently filled windows (one empty, one with two blocks) in one batch."""
    model = randomize(WanDiT(toy_cfg.model))
    a, b = inputs(toy_cfg, 9), inputs(toy_cfg, 3)

    def caches():
        return [model.new_cache(1, toy_cfg.tokens_per_frame, 15, 3) for _ in range(2)]

    with torch.no_grad():
        alone, together = caches(), caches()
        for cache_set in (alone, together):
            for s in (0, 3):
                sl = slice(s, s + 3)
                model.forward_cached(a["x"][:, :, sl], a["t"][:, sl], a["context"], a["y"][:, :, sl], cache_set[0], s)
        ref_a = model.forward_cached(a["x"][:, :, 6:], a["t"][:, 6:], a["context"], a["y"][:, :, 6:], alone[0], 6)
        ref_b = model.forward_cached(b["x"], b["t"], b["context"], b["y"], alone[1], 0)
        both = model.forward_cached_many(
            torch.cat([a["x"][:, :, 6:], b["x"]]),
            torch.cat([a["t"][:, 6:], b["t"]]),
            [a["context"], b["context"]],
            torch.cat([a["y"][:, :, 6:], b["y"]]),
            together,
            [6, 0],
        )
    assert (both[:1] - ref_a).abs().max() < 1e-4 and (both[1:] - ref_b).abs().max() < 1e-4
    for layer in (0, toy_cfg.model.num_layers - 1):  # each stream's cache got its own keys
        assert torch.allclose(together[0].k[layer], alone[0].k[layer], atol=1e-5)
        assert torch.allclose(together[1].k[layer], alone[1].k[layer], atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        model.forward_cached_many(b["x"], b["t"], [b["context"]] * 2, b["y"], caches(), [0, 0])


def test_text_padding_is_kept_on_the_meta_device():
    """FLOP counting runs the DiT on `meta` tensors (bench/sampler.py): there are no values to find padding in."""
    from livetalk_ray.models.dit import drop_text_padding

    context = torch.empty(2, 16, 8, device="meta")
    kept, bias = drop_text_padding(context)
    assert kept is context and bias is None
    real = torch.zeros(2, 16, 8)
    real[:, :3] = 1.0
    kept, bias = drop_text_padding(real)
    assert kept.shape == (2, 4, 8) and bias.shape == (2, 1, 1, 4)  # 3 prompt rows and one for the padding
