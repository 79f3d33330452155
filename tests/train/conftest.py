"""Training fixtures: schema-valid shards of random tensors (fast to make, enough to test the machinery)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from livetalk_ray.config import LiveTalkConfig, load_config
from livetalk_ray.data.schema import rows_to_table, tensor_shapes


def write_random_shards(cfg: LiveTalkConfig, out: Path, shards: int = 2, clips: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        rows = []
        for i in range(clips):
            row = {
                name: (rng.integers(0, 255, shape) if dtype == "uint8" else rng.standard_normal(shape))
                for name, (shape, dtype) in tensor_shapes(cfg).items()
            }
            clip_id = f"clip_{k}_{i}"
            row.update(clip_id=clip_id, source=clip_id, caption="c", raw_caption="c", ref_source="", quality="{}")
            rows.append({**row, "text_len": 4})
        pq.write_table(rows_to_table(rows, cfg), out / "shards" / f"shard-{k:05d}.parquet")
    return out


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
