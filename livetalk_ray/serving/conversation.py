"""Conversation mode's ear: the client's microphone audio goes, in order, to the session's listener on an ASR replica;
what it hears becomes transcripts, user turns and barge-ins for the session (serving/live.py).

Audio waits here at most `serve.asr.max_pending_audio_s` (more is refused with `busy`). An ASR replica that loses the
session (it died, or was replaced) is reported at once (`recovering`, and `not_heard`: the user should say it
again), the listener is opened again on another replica, and `recovered` says when the user is heard again; the
video, the avatar's speech and typed messages go on throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from livetalk_ray import metrics
from livetalk_ray.serving.asr import VAD_WINDOW
from livetalk_ray.serving.protocol import error_event
from livetalk_ray.serving.stage import Stage, StageLost

if TYPE_CHECKING:
    from livetalk_ray.serving.live import Live


class ListenBacklog(RuntimeError):
    """More client audio than `serve.asr.max_pending_audio_s` would be waiting for the ASR stage."""


@dataclass
class Turn:
    """One thing the avatar is to answer or say, and what of its answer was queued to be spoken (tag, text,
    samples), so that an interruption can tell what the user actually heard."""

    kind: str  # chat (typed) | voice (heard) | say (read aloud)
    text: str
    audio: np.ndarray | None = None  # voice turns for an audio-native LLM
    heard_at: float | None = None  # when the user's voice turn ended (end of speech → first answer metric)
    sentences: list[tuple[object, str, int]] = field(default_factory=list)

    def heard_text(self, played: dict[object, int]) -> str:
        """The answer as far as the user heard it: whole sentences, then the heard share of the cut one's words."""
        words: list[str] = []
        for tag, text, samples in self.sentences:
            share = played.get(tag, 0) / samples if samples else 0.0
            if share >= 0.999:
                words += text.split()
            elif share > 0:
                cut = text.split()
                words += cut[: int(len(cut) * share)] + ["..."]
                break
            else:
                break
        return " ".join(words).replace(" ...", "...")


class Ear:
    def __init__(self, live: Live, stage: Stage) -> None:
        self.live, self.stage = live, stage
        self.cfg = live.cfg.serve.asr
        self.rate = live.cfg.audio.sample_rate
        self.keep_audio = live.cfg.serve.llm.audio_input
        self.queue: deque[np.ndarray] = deque()
        self.pending = 0  # samples in `queue`
        self.wakeup = asyncio.Event()
        self.carry: list[str] = []  # parts of a turn not answered yet (a cut monologue, an interrupted thought)
        self.told_long = False  # one `turn_too_long` per monologue
        self.reopening = False  # the listener was lost and is being opened again
        self.task: asyncio.Task | None = None
        # A client that stops sending (push-to-talk, a paused microphone) has gone quiet: once the audio it sent
        # would have played out, plus a pause, the listener hears that pause as silence (once per gap), so a turn
        # ends without trailing silence being sent. A client sending faster than real time has no gap.
        self.audio_end_at = 0.0  # when the audio sent so far ends, at real-time pace
        self.gap_heard = True
        windows = int(np.ceil(self.cfg.end_silence_ms / 1000 * self.rate / VAD_WINDOW)) + 2
        self.pause = np.zeros(windows * VAD_WINDOW, np.float32)

    def push(self, samples: np.ndarray) -> None:
        now = time.monotonic()
        self.audio_end_at = max(self.audio_end_at, now) + len(samples) / self.rate
        self.gap_heard = False
        if self.reopening:
            return  # nothing can hear it now; the client was told (`not_heard`) and hears `recovered` after
        limit = self.cfg.max_pending_audio_s * self.rate
        if self.pending + len(samples) > limit:
            raise ListenBacklog(
                f"{self.pending / self.rate:.1f} s of your audio are still waiting to be heard "
                f"(limit {self.cfg.max_pending_audio_s:g} s): send it at the pace it is spoken"
            )
        self.queue.append(samples)
        self.pending += len(samples)
        self.wakeup.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def open(self, mid_turn: bool = False) -> None:
        sid, timeout = self.live.spec.session_id, self.live.cfg.serve.open_timeout_s
        self.stage.replica = None
        await self.stage.call("open", sid, self.keep_audio, mid_turn, timeout=timeout)
        await self.stage.locate(self.live.cfg.serve.stage_timeout_s)

    def _take(self) -> np.ndarray:
        chunk = np.concatenate(list(self.queue))
        self.queue.clear()
        self.pending = 0
        return chunk

    async def _run(self) -> None:
        sid, timeout = self.live.spec.session_id, self.live.cfg.serve.stage_timeout_s
        while True:
            while not self.queue:
                self.wakeup.clear()
                quiet_in = self.audio_end_at + len(self.pause) / self.rate - time.monotonic()
                if not self.gap_heard and quiet_in <= 0:
                    self.gap_heard = True
                    self.queue.append(self.pause)
                    break
                try:
                    await asyncio.wait_for(self.wakeup.wait(), None if self.gap_heard else quiet_in)
                except TimeoutError:
                    pass
            chunk = self._take()
            try:
                events = await self.stage.call("hear", sid, chunk, timeout=timeout)
            except StageLost as lost:
                await self._recover(lost)
                continue
            for event in events:
                await self._on(event)

    async def _recover(self, lost: StageLost) -> None:
        """The listener was lost (its replica died, or reaped it): tell the client at once, open it again elsewhere
        (waiting for a replacement replica if need be), then tell the client it is heard again. What the user says
        meanwhile, and the rest of a turn the lost listener was hearing, is not heard (the new one waits for a
        pause before it listens)."""
        publish = self.live.driver.publish
        self.reopening = True
        if self.queue:
            self._take()
        publish({"type": "recovering", "stage": "ASR", "reason": f"{lost}; listening again shortly"})
        message = "the listening stage restarted: what you said just now was not heard, please say it again"
        publish(error_event("not_heard", message))
        while True:
            try:
                await self.open(mid_turn=True)
                break
            except StageLost:
                await asyncio.sleep(self.live.cfg.block_seconds)  # no replica yet that could take it
        self.reopening = False
        publish({"type": "recovered", "stage": "ASR"})

    async def _on(self, event: dict) -> None:
        live, kind = self.live, event["event"]
        if kind == "speech_started":
            if live.state in ("thinking", "speaking") and live.cfg.serve.barge_in:
                await live.interrupt()
            return
        if kind == "silence":
            message = (
                f"your audio has been silent for {event['seconds']:g} s: check that your microphone is not muted "
                "and is the one selected"
            )
            live.driver.publish(error_event("no_speech", message))
            return
        if kind == "partial":
            live.driver.publish({"type": "transcript", "role": "user", "text": event["text"], "final": False})
            return
        # final: the user's turn (or a part of a long one) has ended
        text = event["text"]
        live.driver.publish({"type": "transcript", "role": "user", "text": text, "final": True, "cut": event["cut"]})
        if event["cut"]:
            metrics.record(metrics.SERVE_VOICE_TURNS, ending="cut")
            if not self.told_long:
                self.told_long = True
                seconds = self.cfg.max_turn_s
                message = f"you spoke for over {seconds:g} s without a pause: the avatar answers when you pause"
                live.driver.publish(error_event("turn_too_long", message))
            if text:
                self.carry.append(text)
            return
        self.told_long = False
        metrics.record(metrics.SERVE_VOICE_TURNS, ending="pause")
        whole = " ".join([*self.carry, text]).strip()[-live.cfg.serve.max_text_chars :]
        self.carry = []
        audio = event.get("audio")
        if not whole and (audio is None or not len(audio)):
            return  # a sound with no words in it: nothing to answer
        live.add_turn(Turn("voice", whole, audio if self.keep_audio else None, heard_at=time.monotonic()))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
