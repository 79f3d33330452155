"""Cross-session batching on one replica: the calls that arrive while the model is busy become its next batch.

Continuous batching, as LLM servers do it: nothing waits for a batch to fill, so one session alone pays
no latency for batching, and under load each model call serves every session that is ready. One session
never has two items in one batch (a stream's blocks are sequential); its later item waits for the next.
Every computation of the replica, batched or not (priming a session), runs one at a time on a worker
thread, so the event loop keeps answering health checks and cheap calls.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from livetalk_ray import metrics


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int, name: str = "") -> None:
        """`run_batch(items)` returns one result per item, in order: a value, or an exception for that item
        alone. If it raises, every item of the batch gets the exception."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch, self.max_batch, self.name = run_batch, max_batch, name  # name: the deployment's, for metrics
        self.lock = asyncio.Lock()  # the model: one computation at a time
        self._pending: list[tuple[Hashable, Any, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._sizes: deque[int] = deque(maxlen=1000)  # of the last 1,000 batches, for benchmarks and tests

    @property
    def batch_sizes(self) -> list[int]:
        return list(self._sizes)

    async def submit(self, key: Hashable, item: Any) -> Any:
        """Run `item` in the next batch that has no other item of `key` (a session id); returns its result."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((key, item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def exclusive(self, fn: Callable, *args) -> Any:
        """Run one unbatched computation (e.g. priming a session) between batches."""
        async with self.lock:
            return await asyncio.to_thread(fn, *args)

    def _take(self) -> list[tuple[Hashable, Any, asyncio.Future]]:
        batch, keys, rest = [], set(), []
        for entry in self._pending:
            if entry[2].done():  # the caller gave up (cancelled): do not compute for nobody
                continue
            if len(batch) < self.max_batch and entry[0] not in keys:
                batch.append(entry)
                keys.add(entry[0])
            else:
                rest.append(entry)
        self._pending = rest
        return batch

    async def _drain(self) -> None:
        while self._pending:
            async with self.lock:  # calls arriving while we wait for the lock join this batch
                batch = self._take()
                if not batch:
                    continue
                if self.name:
                    metrics.record(metrics.SERVE_QUEUE_DEPTH, len(self._pending), deployment=self.name)
                    metrics.record(metrics.SERVE_BATCH_SIZE, len(batch), deployment=self.name)
                try:
                    results = await asyncio.to_thread(self.run_batch, [item for _, item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the batch's callers get the error
                    results = [exc] * len(batch)
            self._sizes.append(len(batch))
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
