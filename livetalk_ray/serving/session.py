"""One live session, driven by the ingress: speech in, blocks out, at most two blocks in flight.

Serve cannot hand a stream from one deployment to the next, so the driver relays: per block it sends the
Denoiser the audio that block needs (queued speech, or silence while nobody speaks) and gets latents back;
it hands them to the VAEDecoder without waiting, so decoding block k overlaps denoising block k + 1; before
handing over block k + 1 it waits for block k's frames and publishes them. Pacing keeps the stream at most
`serve.lead_blocks` blocks ahead of the wall clock; publishing waits while a subscriber's queue is full
(back-pressure from a slow client). If a stage loses the session (its replica died or was replaced), both
stages are re-primed from the reference image, up to `serve.max_reprimes` times; then the session ends
with an error event.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.serving.denoiser import SessionLost
from livetalk_ray.serving.protocol import encode_block

SUBSCRIBER_BLOCKS = 2  # blocks buffered per subscriber before the driver waits for it
CLOSE_GRACE_S = 5.0  # how long close() lets the current block finish


class StageLost(RuntimeError):
    """A stage no longer holds the session: its replica died, or the session was reaped there."""


class SpeechBacklog(RuntimeError):
    """More speech than `serve.max_queued_speech_s` would be waiting to be spoken in one session."""


@dataclass
class SessionSpec:
    session_id: str
    image: np.ndarray  # [H, W, 3] uint8 at the video size
    persona: str
    prompt: str
    seed: int
    created: float = field(default_factory=time.monotonic)


def _lost(exc: BaseException) -> bool:
    import ray

    cause = getattr(exc, "cause", None)
    return isinstance(exc, SessionLost | ray.exceptions.RayActorError) or isinstance(cause, SessionLost)


class Stage:
    """A deployment as the driver calls it: a Serve handle (routed by session id) or a local object."""

    def __init__(self, name: str, target, session_id: str) -> None:
        self.name, self.session_id = name, session_id
        is_handle = hasattr(target, "options") and hasattr(target, "deployment_name")
        self.target = target.options(session_id=session_id) if is_handle else target
        self.is_handle = is_handle

    async def call(self, method: str, *args):
        try:
            if self.is_handle:
                return await getattr(self.target, method).remote(*args)
            return await getattr(self.target, method)(*args)
        except Exception as exc:
            if _lost(exc):
                raise StageLost(f"{self.name}: {exc}") from exc
            raise

    async def stream(self, method: str, *args) -> AsyncIterator:
        if self.is_handle:
            async for item in getattr(self.target.options(stream=True), method).remote(*args):
                yield item
        else:
            async for item in getattr(self.target, method)(*args):
                yield item


class Subscriber:
    """One reader of a session's output (a WebSocket, an MJPEG viewer). Events never wait; a block waits
    while this reader has SUBSCRIBER_BLOCKS blocks it has not taken yet."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()
        self.slots = asyncio.Semaphore(SUBSCRIBER_BLOCKS)
        self.gone = False

    async def get(self) -> dict | bytes:
        item = await self.items.get()
        if isinstance(item, bytes):
            self.slots.release()
        return item

    def leave(self) -> None:
        self.gone = True
        for _ in range(SUBSCRIBER_BLOCKS + 1):  # wake a driver waiting for this reader
            self.slots.release()


class SessionDriver:
    def __init__(self, spec: SessionSpec, cfg: LiveTalkConfig, denoiser: Stage, decoder: Stage) -> None:
        self.spec, self.cfg = spec, cfg
        self.denoiser, self.decoder = denoiser, decoder
        self.speech: deque[np.ndarray] = deque()
        self.queued_samples = 0  # total length of `speech`, kept so the backlog check is O(1)
        self.subscribers: list[Subscriber] = []
        self.frames_made = 0  # over the whole session, across re-primes
        self.blocks_published = 0
        self.frames_published = 0
        self.first_frame_s: float | None = None
        self.first_frame_marks: dict[str, float] = {}
        self.last_activity = time.monotonic()
        self.closed = asyncio.Event()
        self.task: asyncio.Task | None = None

    # ---- inputs
    def add_speech(self, samples: np.ndarray) -> None:
        """Queue speech; it starts at the next block the driver prepares. Refused (`SpeechBacklog`) past
        `serve.max_queued_speech_s`: a client may not queue hours of audio faster than it is spoken."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        limit = self.cfg.serve.max_queued_speech_s
        if self.queued_speech_s() + len(samples) / self.cfg.audio.sample_rate > limit:
            raise SpeechBacklog(f"{self.queued_speech_s():.1f} s of speech are already waiting (limit {limit:g} s)")
        self.speech.append(samples)
        self.queued_samples += len(samples)
        self.last_activity = time.monotonic()

    async def add_speech_when_room(self, samples: np.ndarray, poll_s: float = 0.1) -> None:
        """`add_speech` for the server's own speech (chat replies): waits while the backlog is full."""
        while True:
            try:
                self.add_speech(samples)
                return
            except SpeechBacklog:
                too_long = len(samples) / self.cfg.audio.sample_rate > self.cfg.serve.max_queued_speech_s
                if self.closed.is_set() or too_long:  # waiting could never help
                    raise
                await asyncio.sleep(poll_s)

    def queued_speech_s(self) -> float:
        return self.queued_samples / self.cfg.audio.sample_rate

    def _take_audio(self, n: int) -> np.ndarray:
        out = np.zeros(max(n, 0), np.float32)  # silence where no speech is queued
        filled = 0
        while filled < n and self.speech:
            head = self.speech[0]
            take = min(len(head), n - filled)
            out[filled : filled + take] = head[:take]
            filled += take
            if take == len(head):
                self.speech.popleft()
            else:
                self.speech[0] = head[take:]
        self.queued_samples -= filled
        return out

    # ---- outputs
    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        self.subscribers.append(subscriber)
        self.last_activity = time.monotonic()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.leave()
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
        self.last_activity = time.monotonic()

    async def publish(self, item: dict | bytes) -> None:
        for subscriber in list(self.subscribers):
            if isinstance(item, bytes):
                await subscriber.slots.acquire()  # waits while this reader is SUBSCRIBER_BLOCKS behind
            if not subscriber.gone:
                subscriber.items.put_nowait(item)

    # ---- the loop
    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        t0, reprimes = time.monotonic(), 0
        try:
            while not self.closed.is_set():
                try:
                    await self._stream(t0)
                except StageLost as lost:
                    reprimes += 1
                    if reprimes > self.cfg.serve.max_reprimes:
                        metrics.record(metrics.SERVE_SESSION_ERRORS, reason="session_lost")
                        await self.publish({"type": "error", "code": "session_lost", "message": str(lost)})
                        return
                    metrics.record(metrics.SERVE_REPRIMES)
                    await self.publish({"type": "reprimed", "reason": str(lost), "count": reprimes})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a broken stage: the client hears about it, the server stays up
            metrics.record(metrics.SERVE_SESSION_ERRORS, reason="internal")
            await self.publish({"type": "error", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            self.closed.set()
            await self.publish({"type": "closed"})  # an event: never waits

    async def _stream(self, t0: float) -> None:
        s, fps = self.spec, self.cfg.video.fps
        needed, pushed = await self.denoiser.call("open", s.session_id, s.image, s.prompt, s.seed), 0
        self._mark("primed_s")
        decoding: tuple | None = None
        try:
            while not self.closed.is_set():
                await self._pace(t0)
                audio = self._take_audio(needed - pushed)
                pushed = needed
                called = time.monotonic()
                block, needed = await self.denoiser.call("next_block", s.session_id, audio)
                metrics.record(metrics.SERVE_STAGE_SECONDS, time.monotonic() - called, stage="denoise")
                self._mark("denoised_s")
                self.frames_made += block.num_frames
                frames = asyncio.create_task(self._decode(block))
                if decoding is not None:
                    await self._publish_block(*decoding, fps)
                decoding = (block, frames)
                # Sequential: decode before the next denoise. Block 0 always is: the first frame is what a user
                # waits for, and block 1 is not due until block 0 has played, so nothing may compete with it.
                if self.cfg.serve.blocks_in_flight == 1 or block.index == 0:
                    await self._publish_block(*decoding, fps)
                    decoding = None
            if decoding is not None:
                await self._publish_block(*decoding, fps)
        finally:  # let a running decode finish (its replica is busy with it anyway), its frames are dropped
            if decoding is not None:
                await asyncio.gather(decoding[1], return_exceptions=True)

    async def _pace(self, t0: float) -> None:
        """Wait while the stream is more than lead_blocks ahead of the wall clock."""
        block_s = self.cfg.cache.frames_per_block * self.cfg.model.audio_frames_per_latent / self.cfg.video.fps
        while not self.closed.is_set():
            ahead = self.frames_made / self.cfg.video.fps - (time.monotonic() - t0)
            if ahead <= self.cfg.serve.lead_blocks * block_s:
                return
            try:
                await asyncio.wait_for(self.closed.wait(), timeout=ahead - self.cfg.serve.lead_blocks * block_s)
            except TimeoutError:
                pass

    async def _publish_block(self, block, frames: asyncio.Task, fps: int) -> None:
        jpegs = await frames
        self._mark("decoded_s")
        header = {
            "index": self.blocks_published,
            "first_frame": self.frames_published,
            "fps": fps,
            "sample_rate": self.cfg.audio.sample_rate,
            "timings": block.timings,
        }
        if self.first_frame_s is None:
            self.first_frame_s = time.monotonic() - self.spec.created
            metrics.record(metrics.SERVE_FIRST_FRAME_SECONDS, self.first_frame_s)
            await self.publish({"type": "first_frame", "latency_s": self.first_frame_s, **self.first_frame_marks})
        await self.publish(encode_block(header, jpegs, block.audio))
        self.blocks_published += 1
        self.frames_published += len(jpegs)
        metrics.record(metrics.SERVE_BLOCKS)
        metrics.record(metrics.SERVE_FRAMES, len(jpegs))

    async def _decode(self, block) -> list[bytes]:
        called = time.monotonic()
        jpegs = await self.decoder.call("decode", self.spec.session_id, block.index, block.latents)
        metrics.record(metrics.SERVE_STAGE_SECONDS, time.monotonic() - called, stage="decode")
        return jpegs

    def _mark(self, name: str) -> None:
        """Seconds since the session was created at which the first block passed each step (the
        `first_frame` event carries them, so a slow start shows where it went)."""
        if self.first_frame_s is None and name not in self.first_frame_marks:
            self.first_frame_marks[name] = round(time.monotonic() - self.spec.created, 4)

    async def close(self) -> None:
        """Stop the loop and release the session on both stages (best effort: a lost replica holds nothing)."""
        self.closed.set()
        if self.task is not None and not self.task.done():
            try:  # the loop ends at its next step; a driver waiting for a stuck reader is cancelled
                await asyncio.wait_for(asyncio.shield(self.task), timeout=CLOSE_GRACE_S)
            except TimeoutError:
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)
        for stage in (self.denoiser, self.decoder):
            try:
                await stage.call("close", self.spec.session_id)
            except Exception:  # noqa: BLE001 - the replica may be gone; nothing is left to release then
                pass
