"""Training-side readers of prepared shards, with the schema checked on open.

- `ShardReader`: a plain single-process reader (tests, evaluation, a laptop): torch batches from pyarrow.
Training reads shards through `train.cursor.DataCursor` (resumable, rank-aware).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.data.schema import SchemaError, check_schema


def shard_files(directory: str | Path) -> list[Path]:
    root = Path(directory)
    shards = root / "shards" if (root / "shards").is_dir() else root
    files = sorted(shards.glob("*.parquet"))
    if not files:
        raise SchemaError(f"no parquet shards under {shards}: make them with `livetalk data prepare --out DIR`")
    return files


def check_shards(directory: str | Path, cfg: LiveTalkConfig) -> list[Path]:
    """Open every shard's footer (cheap) and check its schema against `cfg`."""
    files = shard_files(directory)
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaError(
                f"{f} is not a readable parquet file ({exc}): remove it, or prepare the shards again"
            ) from None
        check_schema(schema, cfg, str(f))
    return files


def table_to_batch(table: pa.Table, columns: list[str] | None = None) -> dict[str, torch.Tensor | list]:
    """Tensor columns → torch tensors [B, ...]; scalar columns → lists (strings) or tensors (ints)."""
    batch: dict[str, torch.Tensor | list] = {}
    for name in columns or table.column_names:
        col = table.column(name)
        if isinstance(col.type, pa.FixedShapeTensorType):
            batch[name] = torch.from_numpy(np.array(col.combine_chunks().to_numpy_ndarray(), copy=True))
        elif pa.types.is_integer(col.type):
            batch[name] = torch.tensor(col.to_pylist())
        else:
            batch[name] = col.to_pylist()
    return batch


def first_batch(directory: str | Path, cfg: LiveTalkConfig, columns: list[str], size: int) -> dict:
    """The first `size` clips of the shards in `directory`, in file order: fixed evaluation conditions."""
    return next(ShardReader(directory, cfg, columns=columns).iter_batches(size))


class ShardReader:
    """Iterate shards in batches of clips; shuffles shard order and rows per epoch when `seed` is given."""

    def __init__(self, directory: str | Path, cfg: LiveTalkConfig, columns: list[str] | None = None) -> None:
        self.files = check_shards(directory, cfg)
        self.columns = columns
        self.num_clips = sum(pq.read_metadata(f).num_rows for f in self.files)

    def __len__(self) -> int:
        return self.num_clips

    def iter_batches(self, batch_size: int, seed: int | None = None, drop_last: bool = False) -> Iterator[dict]:
        rng = np.random.default_rng(seed)
        files = list(self.files) if seed is None else [self.files[i] for i in rng.permutation(len(self.files))]
        pending: pa.Table | None = None
        for f in files:
            table = pq.read_table(f, columns=self.columns)
            if seed is not None:
                table = table.take(rng.permutation(table.num_rows))
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= batch_size:
                yield table_to_batch(pending.slice(0, batch_size))
                pending = pending.slice(batch_size)
        if pending is not None and pending.num_rows and not drop_last:
            yield table_to_batch(pending)
