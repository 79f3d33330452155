"""Schema-valid shards of random tensors: fast to make, for tests and throughput benchmarks whose speed does
not depend on the values (never for quality numbers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from livetalk_ray.config import LiveTalkConfig
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
