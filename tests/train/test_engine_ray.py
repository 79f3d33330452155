"""The DeepSpeed engine inside Ray Train: 2 workers, ZeRO-2 over Ray's gloo group, weights stay in sync."""

import json
from pathlib import Path

import torch


def _loop(config: dict) -> None:
    import ray.train

    from livetalk_ray.config import LiveTalkConfig
    from livetalk_ray.models.dit import WanDiT
    from livetalk_ray.train.engine import TrainEngine

    cfg = LiveTalkConfig.model_validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = WanDiT(cfg.model)
    engine = TrainEngine(model, cfg)
    torch.manual_seed(100 + rank)  # different data per rank: only gradient averaging keeps them equal
    h = cfg.latent_height
    for _ in range(3):
        x0 = torch.randn(1, 16, 3, h, h)
        v = engine.module(
            torch.randn_like(x0),
            torch.rand(1) * 1000,
            torch.randn(1, cfg.text.max_length, cfg.model.text_dim),
            torch.randn(1, 17, 3, h, h),
        )
        engine.backward_step(((v - x0) ** 2).mean())
    engine.save(config["run_dir"])
    facts = {
        "checksum": float(sum(p.double().sum() for p in model.parameters())),
        "optimizer": type(engine.optimizer).__name__,
        "world": torch.distributed.get_world_size(),
    }
    # Result.metrics is not reliable in Train V2 without a checkpoint: each rank leaves a file instead.
    (Path(config["run_dir"]) / f"facts_rank{rank}.json").write_text(json.dumps(facts))


def test_two_ray_train_workers_with_zero2(tmp_path, ray_cluster):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests folder
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from livetalk_ray.config import load_config

    cfg = load_config(
        "toy",
        overrides=[
            "model.dim=32",
            "model.num_heads=2",
            "model.num_layers=4",
            "model.ffn_dim=64",
            "train.engine.zero_stage=2",
            "train.optim.lr=1e-3",
        ],
    )
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_dir": str(tmp_path / "run")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="zero2"),
    )
    trainer.fit()
    facts = [json.loads((tmp_path / "run" / f"facts_rank{r}.json").read_text()) for r in (0, 1)]
    assert facts[0]["world"] == 2 and facts[0]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert facts[0]["checksum"] == facts[1]["checksum"]  # different data, averaged gradients, same weights
    # Both ranks wrote their RNG state; rank 0 the weights, which load and differ from the initial ones.
    step_dir = tmp_path / "run" / "checkpoints" / "step_000003"
    assert (step_dir / "rng_rank0.pt").is_file() and (step_dir / "rng_rank1.pt").is_file()
    from livetalk_ray.models.checkpoint import load_checkpoint
    from livetalk_ray.models.dit import WanDiT

    trained, _ = load_checkpoint(step_dir)
    torch.manual_seed(0)
    initial = WanDiT(cfg.model)
    assert not torch.equal(trained.head.head.weight, initial.head.head.weight)
