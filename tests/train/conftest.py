"""Training fixtures: schema-valid shards of random tensors (fast to make, enough to test the machinery)."""

from __future__ import annotations

from pathlib import Path

import pytest

from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.data.synthetic import write_random_shards


def train_cfg(*overrides: str) -> LiveTalkConfig:
    """A 2-layer toy model that trains a step in milliseconds."""
    return load_config(
        "toy",
        overrides=[
            "model.dim=32",
            "model.num_heads=2",
            "model.num_layers=2",
            "model.ffn_dim=64",
            "train.engine.micro_batch_per_worker=2",
            "train.optim.lr=1e-3",
            "sampler.teacher_steps=8",  # report samples and trajectories in 8 steps (4-step grid ⊂ 8-step grid)
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def random_shards(tmp_path_factory) -> Path:
    return write_random_shards(train_cfg(), tmp_path_factory.mktemp("shards"))
