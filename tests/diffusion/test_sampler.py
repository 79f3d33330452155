import pytest
import torch

from livetalk_ray.diffusion.flow import FlowSchedule
from livetalk_ray.diffusion.sampler import StreamingSampler, reference_condition, sample_teacher
from livetalk_ray.models.dit import WanDiT


def randomized(cfg, causal=True):
    model = WanDiT(cfg.model, causal=causal)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def latent_shape(cfg, frames):
    return (cfg.vae.z_dim, frames, cfg.latent_height, cfg.latent_width)


def conditions(cfg, blocks):
    h, w = cfg.latent_height, cfg.latent_width
    ref = torch.randn(1, cfg.vae.z_dim, 1, h, w)
    text = torch.randn(1, cfg.text.max_length, cfg.model.text_dim)
    audio = torch.randn(1, 3 * blocks, 4, cfg.model.audio_feature_dim)
    return ref, text, audio


def test_streaming_sampler_equals_masked_recomputation(toy_cfg):
    """Each cached step must equal a masked full forward over [clean earlier blocks at t=0, noisy block]."""
    model = randomized(toy_cfg)
    sampler = StreamingSampler(model, toy_cfg)
    ref, text, audio = conditions(toy_cfg, 3)
    state = sampler.start(ref, text, seed=7)
    outs = [sampler.next_block(state, audio[:, 3 * k : 3 * k + 3]) for k in range(3)]

    flow = FlowSchedule(toy_cfg.sampler)
    gen = torch.Generator().manual_seed(7)
    y = reference_condition(ref, 9)
    clean = []
    for k in range(3):
        x = torch.randn(1, *latent_shape(toy_cfg, 3), generator=gen)
        steps = sampler.steps
        for i, t in enumerate(steps.timesteps):
            if k == 0:
                x[:, :, :1] = ref
            seq = torch.cat([*clean, x], 2)
            tt = torch.tensor([[0.0] * 3 * k + [t] * 3])
            with torch.no_grad():
                v = model(seq, tt, text, y[:, :, : 3 * k + 3], audio[:, : 3 * k + 3])[:, :, 3 * k :]
            x0 = flow.x0_from_v(x, v, steps.sigmas[i])
            if i + 1 < len(steps.timesteps):
                x = flow.add_noise(x0, torch.randn(1, *latent_shape(toy_cfg, 3), generator=gen), steps.sigmas[i + 1])
        if k == 0:
            x0[:, :, :1] = ref
        clean.append(x0)
        assert (outs[k] - x0).abs().max() < 1e-4, k
    assert torch.equal(outs[0][:, :, :1], ref)  # latent frame 0 is the clean reference


def test_streams_are_deterministic_per_seed(toy_cfg):
    model = randomized(toy_cfg)
    sampler = StreamingSampler(model, toy_cfg)
    ref, text, audio = conditions(toy_cfg, 1)
    a = sampler.next_block(sampler.start(ref, text, seed=1), audio)
    b = sampler.next_block(sampler.start(ref, text, seed=1), audio)
    c = sampler.next_block(sampler.start(ref, text, seed=2), audio)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_long_stream_keeps_a_constant_cache(tiny_cfg):
    """≥ 2,000 latent frames: the cache never grows and positions never run off a table."""
    for mode in ("absolute", "rebased"):
        cfg = tiny_cfg.model_copy(deep=True)
        cfg.cache.rope_positions = mode
        cfg.sampler.student_steps = 1  # the cache arithmetic is what is under test, not the step count
        model = WanDiT(cfg.model).eval()
        sampler = StreamingSampler(model, cfg)
        ref, text, _ = conditions(cfg, 0)
        state = sampler.start(ref, text)
        size = state.cache.nbytes()
        for _ in range(2001 // 3 + 1):
            out = sampler.next_block(state, None)
        assert state.block_index * 3 >= 2001
        assert state.cache.nbytes() == size and state.cache.num_cached_frames == cfg.cache.local_attn_size
        assert torch.isfinite(out).all()


def test_new_prompt_takes_effect(toy_cfg):
    model = randomized(toy_cfg)
    sampler = StreamingSampler(model, toy_cfg)
    ref, text, audio = conditions(toy_cfg, 2)
    s1, s2 = sampler.start(ref, text, seed=3), sampler.start(ref, text, seed=3)
    sampler.next_block(s1, audio[:, :3])
    sampler.next_block(s2, audio[:, :3])
    sampler.set_prompt(s2, torch.randn_like(text))
    assert not torch.allclose(sampler.next_block(s1, audio[:, 3:]), sampler.next_block(s2, audio[:, 3:]))


def test_teacher_sampler_keeps_student_states(toy_cfg):
    model = randomized(toy_cfg, causal=False)
    ref, text, audio = conditions(toy_cfg, 2)
    final, kept = sample_teacher(
        model,
        toy_cfg,
        torch.randn(1, *latent_shape(toy_cfg, 6)),
        ref,
        text,
        torch.zeros_like(text),
        audio,
        num_steps=8,
        keep_timesteps=[1000.0, 833.3333],
    )
    assert len(kept) == 2 and torch.equal(final[:, :, :1], ref)
    assert torch.equal(kept[0][:, :, :1], ref)


def test_training_rollout_exits_early_with_a_graph_only_through_its_exit_step(tiny_cfg):
    model = randomized(tiny_cfg)
    sampler = StreamingSampler(model, tiny_cfg)
    ref, text, audio = conditions(tiny_cfg, 2)
    full = sampler.next_block(sampler.start(ref, text, seed=3), audio[:, :3])
    assert torch.equal(full, sampler.next_block(sampler.start(ref, text, seed=3), audio[:, :3], exit_step=3))
    early = sampler.next_block(sampler.start(ref, text, seed=3), audio[:, :3], exit_step=1)
    assert not torch.equal(early, full) and not early.requires_grad
    state = sampler.start(ref, text, seed=3)
    blocks = [sampler.next_block(state, audio[:, i : i + 3], exit_step=1, grad=True) for i in (0, 3)]
    assert torch.equal(blocks[0].detach(), early)  # the graph changes nothing about the values
    assert torch.equal(blocks[0][:, :, :1].detach(), ref)  # the reference frame is given
    torch.cat(blocks, dim=2).square().mean().backward()
    assert model.head.head.weight.grad is not None and model.head.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["absolute", "rebased"])
def test_batched_streams_equal_separate_streams(toy_cfg, mode):
    """Cross-session batching: streams that join at different times (different blocks, windows filled to
    different lengths, one past the ring wrap) give the blocks they give alone."""
    cfg = toy_cfg.model_copy(deep=True)
    cfg.cache.rope_positions = mode
    model = randomized(cfg)
    sampler = StreamingSampler(model, cfg)
    conds = [conditions(cfg, 10) for _ in range(3)]

    def start(i):
        ref, text, _ = conds[i]
        return sampler.start(ref, text, seed=10 + i)

    def audio(i, state):
        k = state.block_index
        return conds[i][2][:, 3 * k : 3 * k + 3]

    alone = []
    for i in range(3):
        state = start(i)
        alone.append([sampler.next_block(state, audio(i, state)) for _ in range(10 - 3 * i)])
    states, batched = [start(0)], [[], [], []]
    for round_ in range(10):
        if round_ in (3, 6):  # a stream joins at block 0 while the others are mid-stream
            states.append(start(len(states)))
        live = [i for i, s in enumerate(states) if s.block_index < 10 - 3 * i]
        outs = sampler.next_blocks([states[i] for i in live], [audio(i, states[i]) for i in live])
        for i, out in zip(live, outs, strict=True):
            batched[i].append(out)
    for i in range(3):
        assert len(batched[i]) == len(alone[i])
        for k, (b, a) in enumerate(zip(batched[i], alone[i], strict=True)):
            assert (b - a).abs().max() < 1e-4, (i, k)
    assert torch.equal(batched[2][0][:, :, :1], conds[2][0])  # a joining stream keeps its reference frame
