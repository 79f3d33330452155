"""A session as one Ingress replica holds it: the stream's driver, the conversation that feeds it (client text →
LLM → Speech → the driver's speech queue) and the client's messages (rate-limited, each bad one answered with
an error event, none able to drop the connection)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from fastapi import WebSocket

from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.serving.protocol import ProtocolError, error_event, parse_client_audio, parse_client_text
from livetalk_ray.serving.session import RELEASE_TIMEOUT_S, SessionDriver, SessionSpec, SpeechBacklog
from livetalk_ray.serving.stage import Stage, StageLost

STAGE_NAMES = {"denoiser": "Denoiser", "decoder": "VAEDecoder", "llm": "LLM", "speech": "Speech"}


class Live:
    """A session in this ingress: its driver plus the conversation (LLM → speech → driver)."""

    def __init__(self, spec: SessionSpec, cfg: LiveTalkConfig, handles: dict) -> None:
        self.spec, self.cfg = spec, cfg
        sid = spec.session_id
        probe_after_s = cfg.block_seconds  # a lost replica is noticed within two block times
        stages = {name: Stage(STAGE_NAMES[name], handle, sid, probe_after_s) for name, handle in handles.items()}
        self.llm, self.speech = stages["llm"], stages["speech"]
        self.driver = SessionDriver(spec, cfg, stages["denoiser"], stages["decoder"])
        self.turns: asyncio.Queue = asyncio.Queue(maxsize=8)
        # What was said, kept here too: an LLM replica that dies takes its copy along (re-sent to the next one).
        self.history: deque[tuple[str, str]] = deque(maxlen=cfg.serve.llm.history_turns)
        self.talker: asyncio.Task | None = None

    def start(self) -> None:
        self.driver.start()
        self.talker = asyncio.create_task(self._talk())

    def status(self) -> dict:
        d = self.driver
        return {
            "session_id": self.spec.session_id,
            "blocks": d.blocks_published,
            "frames": d.frames_published,
            "first_frame_s": d.first_frame_s,
            "queued_speech_s": d.queued_speech_s(),
            "viewers": len(d.subscribers),
            "reprimes": d.reprimes,
            "closed": d.closed.is_set(),
        }

    async def receive(self, ws: WebSocket) -> None:
        """Client messages until it disconnects; a bad message is answered with an error event."""
        s, sample_rate, bucket = self.cfg.serve, None, _Bucket(self.cfg.serve.messages_per_s)
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.driver.last_activity = time.monotonic()
            try:
                if not bucket.take():
                    raise ProtocolError(f"more than {s.messages_per_s:g} messages per second")
                if message.get("bytes") is not None:
                    rate = self.cfg.audio.sample_rate
                    self.driver.add_speech(
                        parse_client_audio(message["bytes"], sample_rate, rate, s.max_audio_message_s)
                    )
                    continue
                parsed = parse_client_text(message.get("text") or "", s.max_text_chars)
                if parsed["type"] == "audio_format":
                    sample_rate = parsed["sample_rate"]
                elif parsed["type"] == "prompt":
                    await self.driver.set_prompt(parsed["text"])
                else:
                    self.turns.put_nowait(parsed)
            except ProtocolError as exc:
                await ws.send_json(error_event("bad_message", str(exc)))
            except SpeechBacklog as exc:
                await ws.send_json(error_event("busy", str(exc)))
            except asyncio.QueueFull:
                await ws.send_json(error_event("busy", "8 turns are already waiting"))
            except Exception as exc:  # noqa: BLE001 - a bug answering one message must not drop the connection
                sid = self.spec.session_id
                await ws.send_json(error_event("internal", "this message failed", session_id=sid, exc=exc))

    async def _talk(self) -> None:
        """Turns in order: `chat` asks the LLM and speaks each sentence as it completes; `say` speaks."""
        while True:
            turn = await self.turns.get()
            try:
                if turn["type"] == "say":
                    await self._speak(turn["text"])
                    continue
                self.driver.publish({"type": "transcript", "role": "user", "text": turn["text"]})
                async for sentence in self._reply(turn["text"]):
                    self.driver.publish({"type": "transcript", "role": "assistant", "text": sentence})
                    await self._speak(sentence)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one failed turn must not end the session
                message = str(exc) if isinstance(exc, StageLost) else "this turn could not be answered"
                self.driver.publish(error_event("turn_failed", message, session_id=self.spec.session_id, exc=exc))

    async def _reply(self, text: str):
        """The LLM's sentences. An LLM that lost the session (its replica died) is opened again with the memory kept
        here and asked once more, unless part of the answer was already spoken (then that part is remembered)."""
        sid, timeout = self.spec.session_id, self.cfg.serve.stage_timeout_s
        said: list[str] = []
        try:
            for attempt in range(2):
                try:
                    async for sentence in self.llm.stream("reply", sid, text, timeout=timeout):
                        said.append(sentence)
                        yield sentence
                    return
                except StageLost as lost:
                    if said or attempt:
                        raise
                    self.driver.publish({"type": "recovering", "stage": "LLM", "reason": f"{lost}; reopening the chat"})
                    await self.open_chat()
        finally:
            if said:
                self.history.append((text, " ".join(said)))

    async def open_chat(self) -> None:
        """Open (or re-open, with the memory kept here) the session's chat on an LLM replica."""
        self.llm.replica = None  # opened wherever the router places it now
        await self.llm.call(
            "open", self.spec.session_id, self.spec.persona, list(self.history), timeout=self.cfg.serve.open_timeout_s
        )
        await self.llm.locate(self.cfg.serve.stage_timeout_s)

    async def _speak(self, text: str) -> None:
        for attempt in range(2):  # stateless: a lost replica's call is simply made again, on another one
            try:
                samples = await self.speech.call("synthesize", text, timeout=self.cfg.serve.stage_timeout_s)
                break
            except StageLost as lost:
                if attempt:
                    raise
                self.driver.publish({"type": "recovering", "stage": "Speech", "reason": f"{lost}; trying again"})
        await self.driver.add_speech_when_room(samples)
        self.driver.publish({"type": "speech", "text": text, "seconds": len(samples) / self.cfg.audio.sample_rate})

    async def stop(self, reason: str = "ended") -> None:
        """End the session now for its viewers; `release` frees the stages (it may take longer)."""
        if self.talker is not None:
            self.talker.cancel()
        await self.driver.stop(reason)

    async def release(self) -> None:
        llm = self.llm.call("close", self.spec.session_id, timeout=RELEASE_TIMEOUT_S)
        await asyncio.gather(self.driver.release(), llm, return_exceptions=True)


class _Bucket:
    """Token bucket: `rate` messages per second with a burst of 5 s."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 5 * rate
        self.tokens, self.stamp = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
