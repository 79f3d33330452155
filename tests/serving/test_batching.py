"""Continuous batching on a replica: what arrives during a computation is the next batch, one item per
session per batch, errors stay with their own caller."""

import asyncio
import threading

import pytest

from livetalk_ray.serving.batching import MicroBatcher


def recording_batcher(max_batch=8, fail_on=None):
    batches, release = [], threading.Event()

    def run(items):
        batches.append(list(items))
        if len(batches) == 1:
            release.wait(5)  # the first batch computes until every other call has arrived
        if items == fail_on:
            raise RuntimeError("model failed")
        return [ValueError(f"bad {i}") if str(i).startswith("bad") else f"out {i}" for i in items]

    return MicroBatcher(run, max_batch), batches, release


def test_calls_arriving_during_a_batch_form_the_next_one():
    async def main():
        batcher, batches, release = recording_batcher(max_batch=3)
        first = asyncio.create_task(batcher.submit("a", "a0"))
        await asyncio.sleep(0.05)
        rest = [
            asyncio.create_task(batcher.submit(key, item))
            for key, item in [("a", "a1"), ("b", "b0"), ("c", "c0"), ("d", "d0"), ("b", "b1")]
        ]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest), batches, batcher.batch_sizes

    first, rest, batches, sizes = asyncio.run(main())
    assert first == "out a0" and rest == ["out a1", "out b0", "out c0", "out d0", "out b1"]
    # nothing waited for the first batch to fill; then at most 3, never one session twice in a batch
    assert batches == [["a0"], ["a1", "b0", "c0"], ["d0", "b1"]]
    assert sizes == [1, 3, 2]


def test_an_item_error_reaches_only_its_caller_and_a_batch_error_all_of_the_batch():
    async def main():
        batcher, batches, release = recording_batcher(fail_on=["x0", "y0"])
        release.set()
        ok, bad = await asyncio.gather(batcher.submit("a", "a0"), batcher.submit("b", "bad0"), return_exceptions=True)
        failed = await asyncio.gather(batcher.submit("x", "x0"), batcher.submit("y", "y0"), return_exceptions=True)
        return ok, bad, failed

    ok, bad, failed = asyncio.run(main())
    assert ok == "out a0" and isinstance(bad, ValueError) and str(bad) == "bad bad0"
    assert all(isinstance(e, RuntimeError) and str(e) == "model failed" for e in failed)


def test_exclusive_work_waits_for_the_running_batch():
    async def main():
        batcher, batches, release = recording_batcher()
        order = []
        batch = asyncio.create_task(batcher.submit("a", "a0"))
        await asyncio.sleep(0.05)
        prime = asyncio.create_task(batcher.exclusive(lambda: order.append("prime")))
        await asyncio.sleep(0.05)
        assert order == []  # the batch still holds the model
        release.set()
        await asyncio.gather(batch, prime)
        return order

    assert asyncio.run(main()) == ["prime"]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(lambda items: items, 0)
