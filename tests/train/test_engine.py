"""Full-state checkpoints resume bit-exactly, on the torch and the DeepSpeed backend."""

import pytest
import torch

from livetalk_ray.config import ConfigError, load_config
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.train.engine import TrainEngine, latest_checkpoint, lr_lambda


def make(cfg, seed=0):
    torch.manual_seed(seed)
    model = WanDiT(cfg.model)
    return model, TrainEngine(model, cfg)


def train(engine, model, cfg, steps):
    """A flow-matching-like loss on fresh random batches drawn from the global RNG (restored on resume)."""
    h = cfg.latent_height
    for _ in range(steps * cfg.train.engine.grad_accum_steps):
        x0 = torch.randn(1, 16, 3, h, h)
        noise = torch.randn_like(x0)
        t = torch.rand(1) * 1000
        xt = (1 - t / 1000) * x0 + t / 1000 * noise
        y = torch.randn(1, 17, 3, h, h)
        v = engine.module(xt, t, torch.randn(1, cfg.text.max_length, cfg.model.text_dim), y)
        engine.backward_step(((v - (noise - x0)) ** 2).mean())


@pytest.fixture(params=["torch", "deepspeed"])
def cfg(request):
    return load_config(
        "toy",
        overrides=[
            "model.dim=32",
            "model.num_heads=2",
            "model.num_layers=4",
            "model.ffn_dim=64",
            f"train.engine.backend={request.param}",
            "train.engine.grad_accum_steps=2",
            "train.optim.lr=1e-3",
            "train.optim.warmup_steps=2",
            "train.optim.schedule=cosine",
            "train.max_steps=6",
        ],
    )


def test_resume_is_bit_exact(cfg, tmp_path):
    model_a, engine_a = make(cfg)
    train(engine_a, model_a, cfg, 6)

    model_b, engine_b = make(cfg)
    train(engine_b, model_b, cfg, 3)
    engine_b.save(tmp_path / "run", extra={"data_cursor": 3})
    torch.manual_seed(12345)  # whatever happens in between must not matter
    model_c, engine_c = make(cfg, seed=99)
    state = engine_c.load(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 3 and state["data_cursor"] == 3
    train(engine_c, model_c, cfg, 3)

    assert engine_a.step == engine_c.step == 6
    if cfg.train.engine.backend == "deepspeed":  # really DeepSpeed, with its ZeRO-2 optimizer wrapper
        assert type(engine_c.engine).__name__ == "DeepSpeedEngine"
        assert type(engine_c.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values(), strict=True):
        assert torch.equal(a, c), name
    assert not torch.equal(model_a.state_dict()["head.head.weight"], make(cfg)[0].state_dict()["head.head.weight"])


def test_checkpoint_directory_layout(cfg, tmp_path):
    model, engine = make(cfg)
    train(engine, model, cfg, 1)
    directory = engine.save(tmp_path / "run")
    assert directory.name == "step_000001"
    assert {"model.safetensors", "config.yaml", "trainer.json", "train_state", "rng_rank0.pt"} <= {
        p.name for p in directory.iterdir()
    }
    from livetalk_ray.models.checkpoint import load_checkpoint

    loaded, loaded_cfg = load_checkpoint(directory)
    assert loaded_cfg == cfg
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_lr_schedule():
    cfg = load_config(
        "toy",
        overrides=[
            "train.optim.warmup_steps=4",
            "train.optim.schedule=cosine",
            "train.max_steps=104",
            "train.optim.min_lr_ratio=0.1",
        ],
    )
    f = lr_lambda(cfg.train.optim, cfg.train.max_steps)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(104) == pytest.approx(0.1) and f(54) == pytest.approx(0.55)


def test_resume_refuses_another_model_or_schedule_and_reports_the_rest(tmp_path):
    cfg = load_config("toy", overrides=["model.dim=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=64"])
    model, engine = make(cfg)
    train(engine, model, cfg, 1)
    directory = engine.save(tmp_path / "run")

    longer = cfg.model_copy(deep=True)
    longer.train.max_steps, longer.runtime.device = 500, "cpu"
    state = TrainEngine(make(cfg)[0], longer).load(directory)
    assert state["config_changes"] == ["runtime.device: 'auto' → 'cpu'", "train.max_steps: 1000 → 500"]

    for change in ("train.optim.lr=1e-2", "sampler.shift=3.0"):
        other = load_config("toy", overrides=["model.dim=32", "model.num_heads=2", "model.num_layers=2",
                                              "model.ffn_dim=64", change])  # fmt: skip
        with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.")):
            TrainEngine(make(other)[0], other).load(directory)


def test_a_deepspeed_world_of_one_opens_no_port():
    """Two role actors used to race for a probed free port (EADDRINUSE); a world of one needs no socket."""
    import os
    import subprocess
    import sys

    script = (
        "import os, torch.distributed as dist\n"
        "from livetalk_ray.train.engine import init_distributed_for_deepspeed\n"
        "init_distributed_for_deepspeed()\n"
        "print(dist.get_world_size(), dist.get_rank(), 'MASTER_PORT' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["1", "0", "False"]
