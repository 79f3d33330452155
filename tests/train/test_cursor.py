"""The data cursor: deterministic, disjoint across ranks, exactly resumable, epoch after epoch."""

import pytest

from livetalk_ray.data.reader import shard_files
from livetalk_ray.data.schema import SchemaError
from livetalk_ray.data.synthetic import write_random_shards
from livetalk_ray.train.cursor import DataCursor
from tests.train.conftest import train_cfg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = write_random_shards(train_cfg(), tmp_path_factory.mktemp("cursor"), shards=3, clips=4)
    return shard_files(out)


def ids(cursor: DataCursor, n: int) -> list[list[str]]:
    return [cursor.next_batch()["clip_id"] for _ in range(n)]


def test_ranks_split_each_epoch_into_disjoint_halves(files):
    ranks = [DataCursor(files, ["clip_id"], 2, rank=r, world=2, seed=5) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 3  # 12 clips / (2 × 2)
    epoch = [ids(c, 3) for c in ranks]
    seen = [clip for rank in epoch for batch in rank for clip in batch]
    assert sorted(seen) == sorted(f"clip_{k}_{i}" for k in range(3) for i in range(4))
    # the next epoch is another permutation of the same clips
    again = [clip for c in ranks for batch in ids(c, 3) for clip in batch]
    assert sorted(again) == sorted(seen) and again != seen


def test_same_seed_same_order_and_resume_from_state(files):
    a = DataCursor(files, ["clip_id"], 3, seed=1)
    first = ids(a, 5)  # crosses an epoch boundary (4 steps per epoch)
    assert first == ids(DataCursor(files, ["clip_id"], 3, seed=1), 5)
    assert first != ids(DataCursor(files, ["clip_id"], 3, seed=2), 5)
    b = DataCursor(files, ["clip_id"], 3, seed=1)
    ids(b, 2)
    resumed = DataCursor(files, ["clip_id"], 3, seed=1)
    resumed.load_state_dict(b.state_dict())
    assert ids(resumed, 3) == first[2:]


def test_rows_come_with_their_tensors(files):
    batch = DataCursor(files, ["clip_id", "latents", "text_len"], 4, seed=0).next_batch()
    assert batch["latents"].shape[0] == 4 and batch["text_len"].tolist() == [4, 4, 4, 4]


def test_too_few_clips_for_one_global_batch_is_a_clear_error(files):
    with pytest.raises(SchemaError, match="12 clips in the shards, fewer than one global batch of 16"):
        DataCursor(files, ["clip_id"], 8, rank=0, world=2)
