"""A deterministic, resumable order over parquet shards, split across data-parallel ranks.

Epoch e permutes the shard order and the rows inside each shard with a generator seeded by (seed, e):
shard-local shuffling, so a rank reads one or two shards at a time however large the dataset. The epoch's
stream is cut into global batches of `batch_size × world` clips; rank r takes slice r of each (a partial
last batch is dropped so every rank takes the same number of steps). The cursor's whole state is
(epoch, position): saved with each checkpoint, it makes a resumed run read exactly the clips an
uninterrupted run would have read.

Ray Data's `streaming_split` is the other way to feed Ray Train, but its order depends on scheduling and it
cannot restart mid-epoch, so exact resume would be lost.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livetalk_ray.data.reader import table_to_batch
from livetalk_ray.data.schema import SchemaError


class DataCursor:
    def __init__(
        self,
        files: list[Path],
        columns: list[str],
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        self.files, self.columns = list(files), columns
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.rows_per_file = [pq.read_metadata(f).num_rows for f in self.files]
        self.global_batch = batch_size * world
        total = sum(self.rows_per_file)
        if total < self.global_batch:
            raise SchemaError(too_few_clips(total, batch_size, world))
        self.steps_per_epoch = total // self.global_batch
        self.epoch, self.position = 0, 0  # position: global batches taken in this epoch
        self._order: tuple[int, np.ndarray] | None = None
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()

    # ---- state ----
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # ---- order ----
    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N, 2] (file index, row) for the whole epoch."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts = [
                np.stack([np.full(n, f), rng.permutation(n)], axis=1)
                for f in rng.permutation(len(self.files))
                if (n := self.rows_per_file[f])
            ]
            self._order = (epoch, np.concatenate(parts))
        return self._order[1]

    def _table(self, file_index: int) -> pa.Table:
        if file_index not in self._tables:
            self._tables[file_index] = pq.read_table(self.files[file_index], columns=self.columns)
            if len(self._tables) > 2:  # shard-local order: at most two shards are live at a time
                self._tables.popitem(last=False)
        self._tables.move_to_end(file_index)
        return self._tables[file_index]

    def next_batch(self) -> dict:
        """This rank's next micro-batch (dict of tensors / lists), advancing the shared cursor."""
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        start = self.position * self.global_batch + self.rank * self.batch_size
        picks = order[start : start + self.batch_size]
        self.position += 1
        parts = [self._table(int(f)).take(pa.array([int(r)])) for f, r in picks]
        return table_to_batch(pa.concat_tables(parts))


def too_few_clips(total: int, batch_size: int, world: int) -> str:
    """The message for shards that cannot fill one global batch, with the settings that would."""
    message = (
        f"{total} clips in the shards, fewer than one global batch of {batch_size * world} "
        f"({batch_size} per worker × {world} workers): "
    )
    if total == 0:
        return message + "add clips (`livetalk data prepare` accepted none: see its quarantine.parquet)"
    if total < world:
        return message + f"train on --workers {total} with --set train.engine.micro_batch_per_worker=1, or add clips"
    fit = total // world
    return message + f"lower it with --set train.engine.micro_batch_per_worker={fit}, or add clips"
