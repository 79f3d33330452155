"""Reading prepared shards: the fixed evaluation batch."""

import pyarrow.parquet as pq
import torch

from livetalk_ray.config import load_config
from livetalk_ray.data.reader import first_batch, shard_files, table_to_batch
from livetalk_ray.data.synthetic import write_random_shards


def test_first_batch_is_the_first_clips_in_file_order_with_the_asked_columns(tmp_path):
    cfg = load_config("toy")
    shards = write_random_shards(cfg, tmp_path, shards=2, clips=4)
    batch = first_batch(shards, cfg, ["latents", "audio"], 6)  # spans both shards
    assert set(batch) == {"latents", "audio"} and batch["latents"].shape[0] == 6
    rows = [table_to_batch(pq.read_table(f, columns=["latents"]))["latents"] for f in shard_files(shards)]
    assert torch.equal(batch["latents"], torch.cat(rows)[:6])
    assert torch.equal(first_batch(shards, cfg, ["latents"], 6)["latents"], batch["latents"])  # every call
