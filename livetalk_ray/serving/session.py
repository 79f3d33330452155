"""One live session, driven by the ingress: speech in, blocks out, at most two blocks in flight.

Serve cannot hand a stream from one deployment to the next, so the driver relays: per block it sends the
Denoiser the audio that block needs (queued speech, or silence while nobody speaks) and gets latents back;
it hands them to the VAEDecoder without waiting, so decoding block k overlaps denoising block k + 1; before
handing over block k + 1 it waits for block k's frames and publishes them. Pacing keeps the stream at most
`serve.lead_blocks` blocks ahead of the wall clock.

Publishing never waits: each viewer has its own buffer of `serve.viewer_buffer_blocks` blocks, and a viewer
that leaves it full is dropped (`too_slow`), so one stuck reader cannot stop the others. Every stage call has a
timeout; a stage that loses the session (its replica died, hung, or was replaced) is reported at once with a
`reprimed` event and both stages are re-primed from the reference image, up to `serve.max_reprimes` times in a
row without a frame in between; then the session ends with an error event. A block more than two block times late
for any reason is announced (`delayed`, naming the stage waited for). A session always ends with a `closed` event
naming why.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from livetalk_ray import metrics
from livetalk_ray.audio_timeline import SampleBuffer, sample_at_frame
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.serving.protocol import encode_block, error_event
from livetalk_ray.serving.stage import Stage, StageLost

RELEASE_TIMEOUT_S = 5.0  # a replica that does not confirm a release in this time holds nothing worth waiting for


class SpeechBacklog(RuntimeError):
    """More speech than `serve.max_queued_speech_s` would be waiting to be spoken in one session."""


@dataclass
class SessionSpec:
    session_id: str
    image: bytes  # the reference image as uploaded (checked by the Ingress, decoded by the Denoiser)
    persona: str
    prompt: str
    seed: int
    mode: str = "conversation"  # conversation: the client's audio is heard and answered; puppet: it moves the lips
    created: float = field(default_factory=time.monotonic)


class Subscriber:
    """One reader of a session's output (a WebSocket, an MJPEG viewer), with its own bounded buffer. Events are
    always taken; a block is refused (`offer` → False) while `max_blocks` blocks wait unread, and the driver
    then drops this reader."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.items: deque = deque()
        self.unread_blocks = 0
        self.wakeup = asyncio.Event()
        self.last_read = time.monotonic()

    def offer(self, item: dict | bytes) -> bool:
        if isinstance(item, bytes):
            if self.unread_blocks >= self.max_blocks:
                return False
            self.unread_blocks += 1
        self.items.append(item)
        self.wakeup.set()
        return True

    def end_with(self, *events: dict) -> None:
        """Replace whatever is unread by these last events (a dropped reader learns why, then nothing more)."""
        self.items.clear()
        self.unread_blocks = 0
        self.items.extend(events)
        self.wakeup.set()

    async def get(self) -> dict | bytes:
        while not self.items:
            self.wakeup.clear()
            await self.wakeup.wait()
        item = self.items.popleft()
        if isinstance(item, bytes):
            self.unread_blocks -= 1
        self.last_read = time.monotonic()
        return item


class SessionDriver:
    def __init__(self, spec: SessionSpec, cfg: LiveTalkConfig, denoiser: Stage, decoder: Stage, placement=None) -> None:
        """`placement`: a PlacementClient (serving/placement.py) when the stages' replicas are leased, else None
        (in-process stages, or routing by pin alone)."""
        self.spec, self.cfg = spec, cfg
        self.denoiser, self.decoder = denoiser, decoder
        self.placement = placement
        self.migrations = 0  # moves of this session to another replica (a drain), each without a re-prime
        self.speech: deque[tuple[np.ndarray, object]] = deque()  # (samples, tag): what is still to be spoken
        self.queued_samples = 0  # total length of `speech`, kept so the backlog check is O(1)
        self.in_flight: deque[list] = deque()  # [block, its decode task, its sound, its speech parts], oldest first
        # Published blocks that carried tagged speech: (index, when the client plays it, seconds, parts), so an
        # interruption knows what was heard. The play time follows the page's own scheduling rule (app.js).
        self.heard_log: deque[tuple[int, float, float, list]] = deque(maxlen=64)
        self.client_base: float | None = None
        # Audio pushed to the Denoiser ahead of the blocks made so far (its window reaches past a block), and where
        # each answer's speech lies in it: (first sample, tag, samples).
        self.pushed: SampleBuffer | None = None
        self.pushed_tags: deque[tuple[int, object, int]] = deque()
        self.subscribers: list[Subscriber] = []
        self.frames_made = 0  # over the whole session, across re-primes
        self.blocks_published = 0
        self.frames_published = 0
        self.reprimes = 0  # over the session
        self.failed_reprimes = 0  # since the last published block: more than serve.max_reprimes end the session
        self.last_published = time.monotonic()
        self.waiting_for = "Denoiser"  # the stage the stream waits for now (the `delayed` event names it)
        self.first_frame_s: float | None = None
        self.first_frame_marks: dict[str, float] = {}
        self.last_activity = time.monotonic()  # the client's last message, or a reader's last read
        self.closed = asyncio.Event()
        self.end_reason = "ended"  # the `closed` event's reason: ended | session_lost | internal | server_shutdown
        self.task: asyncio.Task | None = None
        self.pace_origin = time.monotonic()  # wall-clock time of frame 0 of the stream as it is paced now

    # ---- inputs
    def add_speech(self, samples: np.ndarray, tag: object = None) -> None:
        """Queue speech; it starts at the next block the driver prepares. Refused (`SpeechBacklog`) past
        `serve.max_queued_speech_s`: a client may not queue hours of audio faster than it is spoken. `tag` names
        the speech (a sentence of a reply) in `interrupt`'s account of what was heard."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        limit = self.cfg.serve.max_queued_speech_s
        if self.queued_speech_s() + len(samples) / self.cfg.audio.sample_rate > limit:
            raise SpeechBacklog(f"{self.queued_speech_s():.1f} s of speech are already waiting (limit {limit:g} s)")
        self.speech.append((samples, tag))
        self.queued_samples += len(samples)
        self.last_activity = time.monotonic()

    async def add_speech_when_room(self, samples: np.ndarray, tag: object = None, poll_s: float = 0.1) -> None:
        """`add_speech` for the server's own speech (chat replies): waits while the backlog is full."""
        while True:
            try:
                self.add_speech(samples, tag)
                return
            except SpeechBacklog:
                too_long = len(samples) / self.cfg.audio.sample_rate > self.cfg.serve.max_queued_speech_s
                if self.closed.is_set() or too_long:  # waiting could never help
                    raise
                await asyncio.sleep(poll_s)

    def queued_speech_s(self) -> float:
        return self.queued_samples / self.cfg.audio.sample_rate

    async def set_prompt(self, prompt: str) -> None:
        """A new text prompt from the next block on. Kept in the spec first, so a re-primed session keeps it; a
        lost Denoiser is not this call's to report (the stream's next call finds it and re-primes), and while the
        session is being re-primed the client's messages do not wait for it."""
        self.spec.prompt = prompt
        if self.denoiser.replica is None and self.denoiser.is_handle:  # being (re-)primed: `open` takes the new one
            return
        try:
            await self.denoiser.call("set_prompt", self.spec.session_id, prompt, timeout=self.cfg.serve.stage_timeout_s)
        except StageLost:
            pass

    def _take_audio(self, n: int) -> tuple[np.ndarray, list[tuple[object, int]]]:
        """The next `n` samples of queued speech (silence where none is queued), and the (tag, samples) it holds."""
        out = np.zeros(max(n, 0), np.float32)
        filled, parts = 0, []
        while filled < n and self.speech:
            head, tag = self.speech[0]
            take = min(len(head), n - filled)
            out[filled : filled + take] = head[:take]
            filled += take
            if tag is not None:
                parts.append((tag, take))
            if take == len(head):
                self.speech.popleft()
            else:
                self.speech[0] = (head[take:], tag)
        self.queued_samples -= filled
        return out, parts

    def speaking(self) -> bool:
        """Whether tagged speech is queued, in a block not yet published, or published and not yet played."""
        now = time.monotonic()
        return (
            any(tag is not None for _, tag in self.speech)
            or bool(self.pushed_tags)
            or any(parts for *_, parts in self.in_flight)
            or any(parts and start + seconds > now for _, start, seconds, parts in self.heard_log)
        )

    def interrupt(self) -> tuple[int, dict[object, int]]:
        """Stop speaking at once (the user talked over the avatar): queued speech is dropped, and blocks not yet
        published lose their sound. Returns the index of the first published block whose sound the client must
        not play (it plays now or later), and per tag the samples the client has played."""
        self.speech.clear()
        self.queued_samples = 0
        if self.pushed is not None:  # pushed ahead to the Denoiser (its audio window), not yet in a block
            self.pushed.samples[:] = 0
            self.pushed_tags.clear()
        for entry in self.in_flight:
            entry[2] = np.zeros_like(entry[2])
            entry[3] = []
        now, void_from, heard = time.monotonic(), self.blocks_published, {}
        for index, start, seconds, parts in self.heard_log:
            played = float(np.clip((now - start) / seconds, 0.0, 1.0)) if seconds > 0 else 1.0
            if played < 1.0:
                void_from = min(void_from, index)
            for tag, samples in parts:
                heard[tag] = heard.get(tag, 0) + int(round(samples * played))
        self.heard_log.clear()
        return void_from, heard

    # ---- outputs
    def subscribe(self) -> Subscriber:
        """A new reader. One that joins an ended session hears only that it has ended."""
        subscriber = Subscriber(self.cfg.serve.viewer_buffer_blocks)
        if self.closed.is_set() and (self.task is None or self.task.done()):
            subscriber.offer({"type": "closed", "reason": "already_ended"})
            return subscriber
        self.subscribers.append(subscriber)
        self.last_activity = time.monotonic()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
        self.last_activity = time.monotonic()

    def publish(self, item: dict | bytes) -> None:
        """Hand an item to every reader; never waits. A reader whose buffer is full of unread blocks is dropped."""
        for subscriber in list(self.subscribers):
            if not subscriber.offer(item):
                self.subscribers.remove(subscriber)
                metrics.record(metrics.SERVE_SESSION_ERRORS, reason="too_slow")
                blocks = subscriber.max_blocks
                subscriber.end_with(
                    error_event("too_slow", f"this viewer left {blocks} blocks unread; reconnect to catch up"),
                    {"type": "closed", "reason": "too_slow"},
                )

    def idle_s(self) -> float:
        """Seconds since the client last sent a message or any reader last read."""
        last = max([self.last_activity, *(s.last_read for s in self.subscribers)])
        return time.monotonic() - last

    # ---- the loop
    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        s = self.cfg.serve
        watchdog = asyncio.create_task(self._watch_delays())
        try:
            while not self.closed.is_set():
                try:
                    await self._stream()
                except StageLost as lost:
                    if self.closed.is_set():
                        break
                    self.reprimes += 1
                    self.failed_reprimes += 1
                    if self.failed_reprimes > s.max_reprimes:
                        metrics.record(metrics.SERVE_SESSION_ERRORS, reason="session_lost")
                        message = f"{lost}, after {s.max_reprimes} re-primes"
                        self.publish(error_event("session_lost", message, session_id=self.spec.session_id, exc=lost))
                        self.end_reason = "session_lost"
                        return
                    metrics.record(metrics.SERVE_REPRIMES)
                    if self.placement is not None:  # re-prime on a replica other than the one that lost it
                        stage = self.denoiser if lost.stage == self.denoiser.name else self.decoder
                        await self.placement.reassign(stage)
                    reprimed = {"type": "reprimed", "stage": lost.stage, "reason": str(lost), "count": self.reprimes}
                    self.publish(reprimed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a broken stage: the client hears about it, the server stays up
            metrics.record(metrics.SERVE_SESSION_ERRORS, reason="internal")
            self.publish(error_event("internal", "the session failed", session_id=self.spec.session_id, exc=exc))
            self.end_reason = "internal"
        finally:
            watchdog.cancel()
            self.closed.set()
            self.publish({"type": "closed", "reason": self.end_reason})

    async def _watch_delays(self) -> None:
        """Tell the viewers when the next block is more than two block times late (a stage is slow, or a replica
        is loading), naming the stage waited for: a stream is never silent without a word. Once per late block."""
        block_s, told_for = self.cfg.block_seconds, -1
        while not self.closed.is_set():
            await asyncio.sleep(block_s / 4)
            late = time.monotonic() - self.last_published
            if self.first_frame_s is not None and late > 2 * block_s and told_for != self.blocks_published:
                told_for = self.blocks_published
                metrics.record(metrics.SERVE_SESSION_ERRORS, reason="delayed")
                self.publish({"type": "delayed", "waiting_for": self.waiting_for, "seconds": round(late, 2)})

    async def _stream(self) -> None:
        s, fps, timeout = self.spec, self.cfg.video.fps, self.cfg.serve.stage_timeout_s
        if self.placement is None:
            self.denoiser.replica = self.decoder.replica = None  # opened wherever the router places it now
        needed = await self.denoiser.call(
            "open", s.session_id, s.image, s.prompt, s.seed, timeout=self.cfg.serve.open_timeout_s
        )
        pushed, heard = 0, SampleBuffer()  # this stream's pushed audio, on the Denoiser stream's own timeline
        self.pushed, self.pushed_tags = heard, deque()
        self.pace_origin = time.monotonic() - self.frames_made / fps  # a re-primed stream does not race to catch up
        self._mark("primed_s")
        if self.denoiser.replica is None:  # placed by the router's pin: learn where
            await self.denoiser.locate(timeout)
        in_flight, first = self.in_flight, True  # the first block of a stream may warm a replica up
        try:
            while not self.closed.is_set():
                await self._pace()
                audio, parts = self._take_audio(needed - pushed)
                pushed = needed
                start = heard.pushed
                for tag, n in parts:  # where each answer's speech lies on the stream's timeline
                    self.pushed_tags.append((start, tag, n))
                    start += n
                heard.push(audio)
                called, self.waiting_for = time.monotonic(), self.denoiser.name
                call = ("next_block", s.session_id, audio)
                block_timeout = timeout if first else self._stall_timeout(timeout)
                block, needed = await self._placed_call(self.denoiser, *call, timeout=block_timeout)
                first = False
                metrics.record(metrics.SERVE_STAGE_SECONDS, time.monotonic() - called, stage="denoise")
                self._mark("denoised_s")
                self.frames_made += block.num_frames
                sound, parts = self._block_sound(heard, block)
                previous = in_flight[-1][1] if in_flight else None
                decode = asyncio.create_task(self._decode(block, self._stall_timeout(timeout), previous))
                in_flight.append([block, decode, sound, parts])
                # Publish the oldest block once `blocks_in_flight` are out. Block 0 always at once: the first frame
                # is what a user waits for, and block 1 is not due until block 0 has played.
                while in_flight and (len(in_flight) >= self.cfg.serve.blocks_in_flight or block.index == 0):
                    await self._publish_oldest(fps)
                if block.index == 0 and self.decoder.replica is None:
                    await self.decoder.locate(timeout)
            while in_flight:
                await self._publish_oldest(fps)
        finally:  # no decode outlives its stream (a lost stage, a closed session): cancelled, and awaited
            tasks = [task for _, task, *_ in in_flight]
            in_flight.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _block_sound(self, heard: SampleBuffer, block) -> tuple[np.ndarray, list[tuple[object, int]]]:
        """The pushed audio under the block's frames (silence past it), for the client to play with them, and the
        samples of each tagged answer in it."""
        rate, fps = self.cfg.audio.sample_rate, self.cfg.video.fps
        s0 = sample_at_frame(block.first_frame, rate, fps)
        s1 = sample_at_frame(block.first_frame + block.num_frames, rate, fps)
        sound = heard.between(s0, s1)
        heard.drop_before(s1)  # blocks come in order: earlier audio is never read again
        parts = [(tag, min(s1, a + n) - max(s0, a)) for a, tag, n in self.pushed_tags if a < s1 and a + n > s0]
        while self.pushed_tags and self.pushed_tags[0][0] + self.pushed_tags[0][2] <= s1:
            self.pushed_tags.popleft()
        return sound, parts

    def _stall_timeout(self, timeout: float) -> float:
        """How long a streaming call may take. An admitted (placed) session is due at real time: its stage has
        stopped answering for it once the stream falls `serve.admission.stall_blocks` block times behind the wall
        clock, counted from how far ahead the stream is now (calls go out up to `lead_blocks` early)."""
        if self.placement is None:
            return timeout
        ahead = self.frames_made / self.cfg.video.fps - (time.monotonic() - self.pace_origin)
        return min(timeout, self.cfg.serve.admission.stall_blocks * self.cfg.block_seconds + max(0.0, ahead))

    async def _pace(self) -> None:
        """Wait while the stream is more than lead_blocks ahead of the wall clock. A stream that fell behind (a
        stall) does not race to catch up: its viewers' clocks moved back with the stall (app.js plays a late block
        from its arrival), so racing would only fill their buffers, and every later answer would wait behind it."""
        block_s = self.cfg.block_seconds
        behind = (time.monotonic() - self.pace_origin) - self.frames_made / self.cfg.video.fps
        if behind > 0:
            self.pace_origin += behind
        while not self.closed.is_set():
            ahead = self.frames_made / self.cfg.video.fps - (time.monotonic() - self.pace_origin)
            if ahead <= self.cfg.serve.lead_blocks * block_s:
                return
            try:
                await asyncio.wait_for(self.closed.wait(), timeout=ahead - self.cfg.serve.lead_blocks * block_s)
            except TimeoutError:
                pass

    async def _publish_oldest(self, fps: int) -> None:
        """Wait for the oldest block in flight to be decoded, then publish it with its sound."""
        self.waiting_for = self.decoder.name
        block, frames = self.in_flight[0][:2]
        jpegs = await frames
        _, _, sound, parts = self.in_flight.popleft()  # read after the wait: an interruption may have muted it
        self.waiting_for, self.last_published, self.failed_reprimes = "pacing", time.monotonic(), 0
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
            self.publish({"type": "first_frame", "latency_s": self.first_frame_s, **self.first_frame_marks})
        self.publish(encode_block(header, jpegs, sound))
        now, at, seconds = time.monotonic(), self.frames_published / fps, len(jpegs) / fps
        if self.client_base is None or self.client_base + at < now + 0.05:  # app.js: a late block restarts the clock
            self.client_base = now + 0.25 - at
        if parts:
            self.heard_log.append((self.blocks_published, self.client_base + at, seconds, parts))
        self.blocks_published += 1
        self.frames_published += len(jpegs)
        metrics.record(metrics.SERVE_BLOCKS)
        metrics.record(metrics.SERVE_FRAMES, len(jpegs))

    async def _decode(self, block, timeout: float, previous: asyncio.Task | None) -> list[bytes]:
        called = time.monotonic()
        # Block 0 opens the stream on the decoder, which may first have to start a replica (like `open`).
        timeout = self.cfg.serve.open_timeout_s if block.index == 0 else timeout
        args = (self.spec.session_id, block.index, block.latents)
        jpegs = await self._placed_call(self.decoder, "decode", *args, timeout=timeout, after=previous)
        metrics.record(metrics.SERVE_STAGE_SECONDS, time.monotonic() - called, stage="decode")
        return jpegs

    async def _placed_call(self, stage: Stage, method: str, *args, timeout: float, after: asyncio.Task | None = None):
        """A streaming call that survives a drain: when the stage's replica moved the session elsewhere, the call is
        sent again to the new replica (a call that found no session changed nothing), after the call before it
        (`after`), so the moved decoder state sees its blocks in order. Otherwise `StageLost` (re-prime)."""
        tried = stage.replica
        try:
            return await stage.call(method, *args, timeout=timeout)
        except StageLost:
            if self.placement is None or self.closed.is_set():
                raise
            lost_at = time.monotonic()
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            if stage.replica != tried:  # the call before this one found where the session went
                return await stage.call(method, *args, timeout=timeout)
            target = await self.placement.relocate(stage, 2 * self.cfg.block_seconds)
            if target is None:
                raise
            stage.place(target)
            result = await stage.call(method, *args, timeout=timeout)
            self.migrations += 1
            self.publish({"type": "migrated", "stage": stage.name, "pause_s": round(time.monotonic() - lost_at, 3)})
            return result

    def _mark(self, name: str) -> None:
        """Seconds since the session was created at which the first block passed each step (the
        `first_frame` event carries them, so a slow start shows where it went)."""
        if self.first_frame_s is None and name not in self.first_frame_marks:
            self.first_frame_marks[name] = round(time.monotonic() - self.spec.created, 4)

    async def stop(self, reason: str = "ended") -> None:
        """End the stream now: the block being made is dropped, readers get `closed` with `reason`."""
        if not self.closed.is_set():
            self.end_reason = reason
        self.closed.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        elif self.task is None:
            self.publish({"type": "closed", "reason": self.end_reason})

    async def release(self) -> None:
        """Free the session on both stages (best effort: a lost replica holds nothing)."""
        sid = self.spec.session_id
        calls = [stage.call("close", sid, timeout=RELEASE_TIMEOUT_S) for stage in (self.denoiser, self.decoder)]
        await asyncio.gather(*calls, return_exceptions=True)

    async def close(self, reason: str = "ended") -> None:
        await self.stop(reason)
        await self.release()
