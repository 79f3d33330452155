"""Cross-session batching on one replica: the calls that arrive while the model is busy become its next batch.

Continuous batching, as LLM servers do it: one session alone pays no latency for batching, and under load
each model call serves every session that is ready. One session never has two items in one batch (a
stream's blocks are sequential); its later item waits for the next.

Unpaced, sessions split into groups that alternate (two of four compute while the other two are decoding,
and so on): a batch of 4 costs about 2x a batch of 1 here, two batches of 2 about 2.9x. So when fewer
sessions are ready than the replica holds, the batch may wait for the others, at most `gather` times the
last batch's compute time (0 = never wait); a session that is not coming costs only that bounded wait.
Every computation of the replica, batched or not (priming a session), runs one at a time on a worker
thread, so the event loop keeps answering health checks and cheap calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from livetalk_ray import metrics


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        max_batch: int,
        name: str = "",
        gather: float = 0.0,
        sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        """`run_batch(items)` returns one result per item, in order: a value, or an exception for that item
        alone. If it raises, every item of the batch gets the exception. `sessions()` is how many sessions the
        replica holds (the batch a `gather` wait hopes for)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if gather < 0:
            raise ValueError(f"gather must be at least 0, got {gather}")
        self.run_batch, self.max_batch, self.name = run_batch, max_batch, name  # name: the deployment's, for metrics
        self.gather, self.sessions = gather, sessions
        self._last_compute_s = 0.0
        self._arrived = asyncio.Event()
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
        self._arrived.set()
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

    def _ready_sessions(self) -> int:
        return len({key for key, _, future in self._pending if not future.done()})

    async def _gather(self) -> None:
        """Wait (bounded) until every session the replica holds has an item pending, or the batch is full."""
        want = min(self.max_batch, self.sessions())
        if self.gather <= 0 or self._ready_sessions() >= want:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather * self._last_compute_s
        while self._ready_sessions() < want and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        while self._pending:
            async with self.lock:  # calls arriving while we wait for the lock join this batch
                await self._gather()
                batch = self._take()
                if not batch:
                    continue
                if self.name:
                    metrics.record(metrics.SERVE_QUEUE_DEPTH, len(self._pending), deployment=self.name)
                    metrics.record(metrics.SERVE_BATCH_SIZE, len(batch), deployment=self.name)
                started = time.perf_counter()
                try:
                    results = await asyncio.to_thread(self.run_batch, [item for _, item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - the batch's callers get the error
                    results = [exc] * len(batch)
                self._last_compute_s = time.perf_counter() - started
            self._sizes.append(len(batch))
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
