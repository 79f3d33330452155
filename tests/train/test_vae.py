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
            "train.vae.eval_clips=2",
            "train.checkpoint_every=3",
            *[f"{k}={v}" for k, v in over.items()],
        ],
    )


def test_fit_improves_psnr_and_exports_a_loadable_vae(clips, tmp_path):
    result = train_vae(cfg(), clips, tmp_path / "run", max_steps=6, resume=False)
    history = result["history"]
    assert [h["step"] for h in history] == [3, 6]
    untrained = train_vae(cfg(), clips, tmp_path / "zero", max_steps=0, resume=False)["history"][0]["psnr_db"]
    assert history[-1]["psnr_db"] > untrained + 1.0, (untrained, history)
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
    z = vae.encode(to_video(np.stack([f[:17] for f in frames])))
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
        cfg(**{"vae.path": base, "train.vae.train_encoder": "false", "train.vae.window_frames": 21}),
        clips,
        tmp_path / "tuned",
        max_steps=3,
        resume=False,
    )["vae_path"]
    a = WanVAE(cfg().vae.model_copy(update={"path": base})).model.state_dict()
    b = WanVAE(cfg().vae.model_copy(update={"path": tuned})).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
