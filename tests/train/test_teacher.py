import torch

from livetalk_ray.config import load_config
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.engine import TrainEngine
from livetalk_ray.train.teacher import teacher_loss


def batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f, z, h = 9, cfg.vae.z_dim, cfg.latent_height
    return {
        "latents": torch.randn(b, z, f, h, h, generator=g),
        "ref_latent": torch.randn(b, z, 1, h, h, generator=g),
        "audio_features": torch.randn(b, 4 * (f - 1) + 1, cfg.audio.feature_dim, generator=g),
        "text_embedding": torch.randn(b, cfg.text.max_length, cfg.text.d_model, generator=g),
    }


def test_loss_ignores_the_reference_frame_and_is_seeded():
    cfg = load_config("toy", overrides=["model.num_layers=2"])
    model = WanDiT(cfg.model, causal=False)
    data = batch(cfg)
    a = teacher_loss(model, data, cfg, torch.Generator().manual_seed(1))
    b = teacher_loss(model, data, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.item() > 0
    changed = {**data, "latents": data["latents"].clone()}
    changed["latents"][:, :, 0] += 100.0  # frame 0 is replaced by the reference latent: no effect
    assert torch.equal(teacher_loss(model, changed, cfg, torch.Generator().manual_seed(1)), a)


def test_a_few_steps_fit_a_fixed_batch():
    cfg = load_config("toy", overrides=["model.num_layers=2", "train.engine.backend=torch", "train.optim.lr=2e-3"])
    torch.manual_seed(0)
    model = WanDiT(cfg.model, causal=False)
    engine = TrainEngine(model, cfg)
    data = batch(cfg)
    losses = []
    for step in range(40):
        loss = teacher_loss(model, data, cfg, torch.Generator().manual_seed(step % 4))
        engine.backward_step(loss)
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses


def test_teacher_starts_from_given_weights_or_refuses_a_mismatch(tmp_path):
    import pytest

    from livetalk_ray.models.checkpoint import CheckpointError, save_checkpoint
    from livetalk_ray.train.teacher import build_teacher

    cfg = load_config("toy", overrides=["model.num_layers=2"])
    source = WanDiT(cfg.model, causal=False)
    torch.nn.init.normal_(source.head.head.weight)
    save_checkpoint(source, cfg, tmp_path / "init")
    cfg.train.teacher.init_checkpoint = str(tmp_path / "init")
    model = build_teacher(cfg, "cpu", torch.float32)
    assert not model.causal and torch.equal(model.head.head.weight, source.head.head.weight)
    bigger = load_config("toy", overrides=["model.num_layers=4"])
    bigger.train.teacher.init_checkpoint = str(tmp_path / "init")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        build_teacher(bigger, "cpu", torch.float32)
