import json

import numpy as np
import pytest
import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.vae import WanVAE
from livetalk_ray.toyworld.clips import make_demo_dataset
from livetalk_ray.train.vae import train_vae


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    make_demo_dataset(out, 6, seed=4, corrupt_fraction=1 / 6, progress=False)  # one broken clip is skipped
    return out


def cfg(**over):
    return load_config(
        "toy",
        overrides=[
            "train.vae.clips_per_step=2",
            "train.vae.psnr_clips=2",
            "train.vae.eval_stream_seconds=3",
            "train.vae.chunk_latents=2",
            "train.vae.schedule=constant",
            "train.checkpoint_every=3",
            *[f"{k}={v}" for k, v in over.items()],
        ],
    )


def test_fit_improves_psnr_and_exports_a_loadable_vae(clips, tmp_path):
    result = train_vae(cfg(), clips, tmp_path / "run", max_steps=6, resume=False)
    history = result["history"]
    assert [h["step"] for h in history] == [3, 6]
    untrained = train_vae(cfg(), clips, tmp_path / "zero", max_steps=0, resume=False)["history"][0]
    assert history[-1]["psnr_db"] > untrained["psnr_db"] + 1.0, (untrained, history)
    assert history[-1]["stream_psnr_db"] > untrained["stream_psnr_db"] + 1.0, (untrained, history)
    vae = WanVAE(cfg().vae.model_copy(update={"path": result["vae_path"]}))
    assert vae.encode(torch.zeros(1, 3, 5, 64, 64)).shape == (
        1,
        cfg().vae.z_dim,
        2,
        cfg().latent_height,
        cfg().latent_width,
    )
    # The export carries its own latent statistics: the DiT sees unit-scale latents per channel.
    from livetalk_ray.train.vae import load_clips, to_video

    frames = load_clips(clips, cfg())
    z = vae.encode(to_video(np.stack([f[:33] for f in frames])))
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 0.5 and (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 0.5
    assert json.loads((tmp_path / "run" / "vae_report.json").read_text())["history"] == history


def test_resume_is_bit_exact(clips, tmp_path):
    full = train_vae(cfg(), clips, tmp_path / "a", max_steps=6, resume=False)
    train_vae(cfg(), clips, tmp_path / "b", max_steps=3, resume=False)
    resumed = train_vae(cfg(), clips, tmp_path / "b", max_steps=6, resume=True)
    a = WanVAE(cfg().vae.model_copy(update={"path": full["vae_path"]})).model.state_dict()
    b = WanVAE(cfg().vae.model_copy(update={"path": resumed["vae_path"]})).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"]


def test_decoder_only_fine_tune_keeps_the_latents(clips, tmp_path):
    base = train_vae(cfg(), clips, tmp_path / "base", max_steps=3, resume=False)["vae_path"]
    tuned = train_vae(
        cfg(**{"vae.path": base, "train.vae.train_encoder": "false"}),
        clips,
        tmp_path / "tuned",
        max_steps=3,
        resume=False,
    )["vae_path"]
    a = WanVAE(cfg().vae.model_copy(update={"path": base})).model.state_dict()
    b = WanVAE(cfg().vae.model_copy(update={"path": tuned})).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))


def test_ping_pong_plays_a_clip_back_and_forth_without_cuts():
    from livetalk_ray.train.vae import ping_pong

    clip = np.arange(4)
    assert ping_pong(clip, 0, 10).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert ping_pong(clip, 5, 4).tolist() == [1, 0, 1, 2]


def test_training_streams_advance_in_chunks_of_their_ping_pong_clips(clips):
    from livetalk_ray.train.vae import StreamPool, load_clips, ping_pong, stream_loss

    c = cfg()
    model = WanVAE(c.vae).model.train().requires_grad_(True)
    pool = StreamPool(load_clips(clips, c), size=3, episode_chunks=4, generator=torch.Generator().manual_seed(0))
    first = pool.streams[0]
    fed: list[np.ndarray] = []
    original = first.next_frames
    first.next_frames = lambda *a: fed.append(original(*a)) or fed[-1]
    seen, generator = set(), torch.Generator().manual_seed(1)
    for _ in range(12):
        picked = pool.pick(2)
        loss = stream_loss(model, picked, 4, 1e-6, generator)
        assert torch.isfinite(loss)
        loss.backward()
        seen.update(id(s) for s in picked)
        pool.after_step(picked)
        caches = [x for s in pool.streams for x in (s.encoder_cache or []) + (s.decoder_cache or [])]
        assert not any(torch.is_tensor(x) and x.requires_grad for x in caches)  # graphs end with the step
    # the first stream got its clip's ping-pong frames in chunks: 1 + 4·3 frames first, 4·4 after
    assert [len(f) for f in fed][:2] == [13, 16]
    assert np.array_equal(np.concatenate(fed), ping_pong(first.clip, first.start, sum(len(f) for f in fed)))
    assert first.chunks == len(fed) and (first not in pool.streams) == (first.chunks >= first.length)
    assert len(seen) > 3  # ended streams were replaced by new ones


def test_stream_reconstruction_equals_whole_clip_reconstruction(clips):
    from livetalk_ray.train.vae import load_clips, reconstruct_stream, to_video

    c = cfg()
    model = WanVAE(c.vae).model.eval()
    video = to_video(np.stack([f[:21] for f in load_clips(clips, c)[:2]]))
    with torch.no_grad():
        whole = model.decode(model.encode(video).latent_dist.mode()).sample.clamp(-1, 1)
    assert torch.allclose(reconstruct_stream(model, video), whole, atol=1e-4)
