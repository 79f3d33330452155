import pytest
import torch

from livetalk_ray.models.kv_cache import KVCache


def make_cache(window=15, sinks=9, mode="absolute") -> KVCache:
    return KVCache(
        num_layers=1,
        batch_size=1,
        num_heads=1,
        head_dim=2,
        tokens_per_frame=1,
        frames_per_block=3,
        window_frames=window,
        sink_frames=sinks,
        position_mode=mode,
    )


def cached_frames(cache: KVCache) -> list[int]:
    return sorted(f for f in cache.slot_frame.tolist() if f >= 0)


def test_anchor_heavy_window_matches_livetalk_eviction():
    """After block n ≥ 4: frames 0-8 stay as anchors, then the previous block, then the current one."""
    cache = make_cache()
    for block in range(8):
        cache.prepare(3 * block, 3)
        if block == 4:
            assert cached_frames(cache) == list(range(15))
        if block == 5:
            assert cached_frames(cache) == [*range(9), 12, 13, 14, 15, 16, 17]
    assert cached_frames(cache) == [*range(9), 18, 19, 20, 21, 22, 23]


def test_view_reads_earlier_frames_with_positions():
    cache = make_cache()
    for block in range(7):
        view = cache.prepare(3 * block, 3)
    assert view.read_positions.tolist() == [*range(9), 15, 16, 17]
    assert view.query_positions.tolist() == [18, 19, 20]
    # a rerun of the same block (next denoising step or refill) reads the same context
    again = cache.prepare(18, 3)
    assert again.read_tokens.tolist() == view.read_tokens.tolist()


def test_rebased_positions_stay_inside_the_window():
    cache = make_cache(mode="rebased")
    for block in range(1000):
        view = cache.prepare(3 * block, 3)
    assert view.read_positions.tolist() == list(range(12))
    assert view.query_positions.tolist() == [12, 13, 14]


def test_blocks_must_arrive_in_order():
    cache = make_cache()
    cache.prepare(0, 3)
    with pytest.raises(ValueError, match="in order"):
        cache.prepare(6, 3)
    with pytest.raises(ValueError, match="whole block"):
        cache.prepare(3, 2)


def test_bad_window_is_rejected():
    with pytest.raises(ValueError):
        make_cache(window=9, sinks=9)
    with pytest.raises(ValueError):
        make_cache(window=14, sinks=9)


def test_memory_is_fixed_by_the_window():
    cache = KVCache(
        num_layers=30,
        batch_size=1,
        num_heads=12,
        head_dim=128,
        tokens_per_frame=1024,
        frames_per_block=3,
        window_frames=15,
        sink_frames=9,
        device="meta",
        dtype=torch.bfloat16,
    )
    assert cache.nbytes() == 30 * 2 * 15 * 1024 * 1536 * 2  # LiveTalk 1.3B at 512x512: ~2.6 GiB
