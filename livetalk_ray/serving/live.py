"""A session as one Ingress replica holds it: the stream's driver, the conversation that feeds it (client text, or
in conversation mode the user's voice heard by the ASR stage → LLM → Speech → the driver's speech queue) and the
client's messages (rate-limited, each bad one answered with an error event, none able to drop the connection).

The avatar's state (`listening`, `thinking`, `speaking`) is published whenever it changes. When the user talks over
the avatar (conversation mode, `serve.barge_in`), the answer is cut: the turn in flight is cancelled, queued speech
is dropped, the client hears `interrupted` with the block from which its buffered sound is void, and the chat's
memory keeps only what the user heard."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from fastapi import WebSocket

from livetalk_ray import metrics
from livetalk_ray.config import LiveTalkConfig
from livetalk_ray.serving.conversation import Ear, ListenBacklog, Turn
from livetalk_ray.serving.llm import SpokenSentence
from livetalk_ray.serving.protocol import ProtocolError, error_event, parse_client_audio, parse_client_text
from livetalk_ray.serving.session import RELEASE_TIMEOUT_S, SessionDriver, SessionSpec, SpeechBacklog, Subscriber
from livetalk_ray.serving.stage import Stage, StageLost

STAGE_NAMES = {"denoiser": "Denoiser", "decoder": "VAEDecoder", "llm": "LLM", "speech": "Speech", "asr": "ASR"}
MAX_TURNS = 8  # turns waiting to be answered, per session
QUEUE_POLL_S = 0.5  # how often a queued session asks Placement for its slots


class Live:
    """A session in this ingress: its driver plus the conversation (LLM → speech → driver)."""

    def __init__(self, spec: SessionSpec, cfg: LiveTalkConfig, handles: dict, placement=None) -> None:
        """`placement`: a PlacementClient when the app admits sessions into leased slots (serving/placement.py)."""
        self.spec, self.cfg = spec, cfg
        sid = spec.session_id
        probe_after_s = cfg.block_seconds  # a lost replica is noticed within two block times
        stages = {name: Stage(STAGE_NAMES[name], handle, sid, probe_after_s) for name, handle in handles.items()}
        self.llm, self.speech = stages["llm"], stages["speech"]
        self.placement = placement
        self.driver = SessionDriver(spec, cfg, stages["denoiser"], stages["decoder"], placement)
        self.queue: dict | None = None  # {"position", "estimated_wait_s"} while waiting for slots
        self.admitter: asyncio.Task | None = None
        self.turns: deque[Turn] = deque()
        self.turn_ready = asyncio.Event()
        self.current: Turn | None = None  # the turn being answered
        self.turn_task: asyncio.Task | None = None
        self.turns_made = 0  # numbers the speech tags
        # What was said, kept here too: an LLM replica that dies takes its copy along (re-sent to the next one).
        self.history: deque[tuple[str, str]] = deque(maxlen=cfg.serve.llm.history_turns)
        self.talker: asyncio.Task | None = None
        self.watcher: asyncio.Task | None = None
        self.state = "listening"
        self.ear = Ear(self, stages["asr"]) if spec.mode == "conversation" and "asr" in stages else None

    def place(self, lease: dict[str, str | None]) -> None:
        """Stream on the replicas Placement leased (stage name → replica id)."""
        self.driver.denoiser.place(lease.get(self.driver.denoiser.name))
        self.driver.decoder.place(lease.get(self.driver.decoder.name))

    def leased(self) -> dict[str, str | None]:
        """Where the session streams now (renewed with Placement, which rebuilds a lost lease from it)."""
        return {stage.name: stage.replica for stage in (self.driver.denoiser, self.driver.decoder)}

    def wait_for_slots(self, holder: str, queue: dict) -> None:
        """A session admitted to the queue: it starts once Placement leases it slots. Until then its viewers hear
        `queued` (position, estimated wait) whenever that changes."""
        self.queue = queue
        self.admitter = asyncio.create_task(self._wait_for_slots(holder))

    async def _wait_for_slots(self, holder: str) -> None:
        sid, enqueued, told = self.spec.session_id, time.monotonic(), None
        try:
            while True:
                try:
                    answer = await self.placement.call("admit", sid, holder)
                except Exception:  # noqa: BLE001 - Placement restarting: keep the place, ask again
                    answer = {"queued": self.queue}
                if "lease" in answer:
                    break
                if "full" in answer:  # dropped from the queue (Placement restarted and filled up meanwhile)
                    raise StageLost("Placement", "has no slot for this session any more; create it again")
                self.queue = answer["queued"]
                if self.driver.subscribers:  # a viewer waits with it: not idle (there are no blocks to read yet)
                    self.driver.last_activity = time.monotonic()
                if self.queue != told:
                    told = self.queue
                    self.driver.publish({"type": "queued", **self.queue})
                await asyncio.sleep(QUEUE_POLL_S)
            metrics.record(metrics.SERVE_QUEUE_WAIT_SECONDS, time.monotonic() - enqueued)
            self.queue = None
            self.place(answer["lease"])
            await asyncio.gather(self.open_chat(), self.open_ear())
            self.driver.publish({"type": "admitted", "waited_s": round(time.monotonic() - enqueued, 2)})
            self.spec.created = time.monotonic()  # first-frame latency counts from here
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the viewer hears why, the server stays up
            message = str(exc) if isinstance(exc, StageLost) else "the session could not start"
            self.driver.publish(error_event("session_lost", message, session_id=sid, exc=exc))
            self.driver.end_reason = "session_lost"
            await self.driver.stop("session_lost")
            return
        self.start()

    def start(self) -> None:
        self.driver.start()
        self.talker = asyncio.create_task(self._talk())
        self.watcher = asyncio.create_task(self._watch_speaking())
        if self.ear is not None:
            self.ear.start()

    def subscribe(self) -> Subscriber:
        """A new reader of the session; its first event is the avatar's state now (and the session's mode)."""
        subscriber = self.driver.subscribe()
        if not self.driver.closed.is_set():
            subscriber.offer({"type": "state", "state": self.state, "mode": self.spec.mode})
            if self.queue is not None:  # not streaming yet: where it stands in the queue
                subscriber.offer({"type": "queued", **self.queue})
        return subscriber

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.driver.publish({"type": "state", "state": state})

    def add_turn(self, turn: Turn) -> None:
        if len(self.turns) >= MAX_TURNS:
            raise asyncio.QueueFull
        self.turns.append(turn)
        self.turn_ready.set()

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
            "mode": self.spec.mode,
            "state": "queued" if self.queue is not None else self.state,
            "queue": self.queue,
            "migrations": d.migrations,
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
                    samples = parse_client_audio(message["bytes"], sample_rate, rate, s.max_audio_message_s)
                    if self.ear is not None:  # conversation: heard, not mouthed
                        self.ear.push(samples)
                    else:
                        self.driver.add_speech(samples)
                    continue
                parsed = parse_client_text(message.get("text") or "", s.max_text_chars)
                if parsed["type"] == "audio_format":
                    sample_rate = parsed["sample_rate"]
                elif parsed["type"] == "prompt":
                    await self.driver.set_prompt(parsed["text"])
                else:
                    self.add_turn(Turn(parsed["type"], parsed["text"]))
            except ProtocolError as exc:
                await ws.send_json(error_event("bad_message", str(exc)))
            except (SpeechBacklog, ListenBacklog) as exc:
                await ws.send_json(error_event("busy", str(exc)))
            except asyncio.QueueFull:
                await ws.send_json(error_event("busy", f"{MAX_TURNS} turns are already waiting"))
            except Exception as exc:  # noqa: BLE001 - a bug answering one message must not drop the connection
                sid = self.spec.session_id
                await ws.send_json(error_event("internal", "this message failed", session_id=sid, exc=exc))

    async def _talk(self) -> None:
        """Turns in order, each in a task of its own so that a barge-in can cancel it and the loop goes on."""
        while True:
            while not self.turns:
                self.turn_ready.clear()
                await self.turn_ready.wait()
            self.current = self.turns.popleft()
            self.turn_task = asyncio.create_task(self._answer(self.current))
            await asyncio.wait({self.turn_task})
            self.turn_task = None

    async def _answer(self, turn: Turn) -> None:
        """`chat` and `voice` ask the LLM and speak each sentence as it completes; `say` speaks."""
        try:
            if turn.kind == "say":
                await self._speak(turn, turn.text)
                return
            if turn.kind == "chat":
                self.driver.publish({"type": "transcript", "role": "user", "text": turn.text})
            self.set_state("thinking")
            async for sentence in self._reply(turn.text, turn.audio):
                text = sentence.text if isinstance(sentence, SpokenSentence) else sentence
                if text:
                    self.driver.publish({"type": "transcript", "role": "assistant", "text": text})
                await self._speak(turn, text, sentence.audio if isinstance(sentence, SpokenSentence) else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed turn must not end the session
            message = str(exc) if isinstance(exc, StageLost) else "this turn could not be answered"
            self.driver.publish(error_event("turn_failed", message, session_id=self.spec.session_id, exc=exc))
        finally:
            if self.state == "thinking":  # nothing was spoken
                self.set_state("listening")

    async def _watch_speaking(self) -> None:
        """Back to listening once the last answer has been played (the driver knows when the client plays it)."""
        while True:
            await asyncio.sleep(self.cfg.block_seconds / 4)
            if self.state == "speaking" and self.turn_task is None and not self.driver.speaking():
                self.set_state("listening")

    async def interrupt(self) -> None:
        """The user talks over the avatar: cut the answer now (see the module doc)."""
        turn, task = self.current, self.turn_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.turns.clear()
        void_from, played = self.driver.interrupt()
        metrics.record(metrics.SERVE_BARGE_INS)
        heard = turn.heard_text(played) if turn is not None else ""
        if turn is not None and turn.kind == "voice" and not turn.sentences and self.ear is not None:
            self.ear.carry.insert(0, turn.text)  # cut while thinking: the user had not finished; answer it all
        if turn is not None and turn.kind != "say" and turn.sentences:
            if self.history and self.history[-1][0] == turn.text:
                self.history.pop()
            if heard:
                self.history.append((turn.text, heard))
            try:  # the replica's memory becomes this one (a re-open; the cut stream cannot add to it any more)
                await self.open_chat()
            except StageLost:
                pass  # the next turn re-opens it anyway
        self.driver.publish({"type": "interrupted", "from_block": void_from, "heard": heard})
        self.set_state("listening")

    async def _reply(self, text: str, audio=None):
        """The LLM's sentences. An LLM that lost the session (its replica died) is opened again with the memory kept
        here and asked once more, unless part of the answer was already spoken (then that part is remembered)."""
        sid, timeout = self.spec.session_id, self.cfg.serve.stage_timeout_s
        said: list[str] = []
        try:
            for attempt in range(2):
                try:
                    async for sentence in self.llm.stream("reply", sid, text, audio, timeout=timeout):
                        words = sentence.text if isinstance(sentence, SpokenSentence) else sentence
                        if words:
                            said.append(words)
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

    async def _speak(self, turn: Turn, text: str, samples=None) -> None:
        """Queue `text` spoken (by the Speech stage, unless the model sent its own `samples`)."""
        for attempt in range(2 if samples is None else 0):  # stateless: a lost replica's call is made again elsewhere
            try:
                samples = await self.speech.call("synthesize", text, timeout=self.cfg.serve.stage_timeout_s)
                break
            except StageLost as lost:
                if attempt:
                    raise
                self.driver.publish({"type": "recovering", "stage": "Speech", "reason": f"{lost}; trying again"})
        self.turns_made += 1
        tag = (id(turn), self.turns_made)
        await self.driver.add_speech_when_room(samples, tag)
        turn.sentences.append((tag, text, len(samples)))
        if turn.heard_at is not None and len(turn.sentences) == 1:
            metrics.record(metrics.SERVE_TURN_TO_SPEECH_SECONDS, time.monotonic() - turn.heard_at)
        self.set_state("speaking")
        self.driver.publish({"type": "speech", "text": text, "seconds": len(samples) / self.cfg.audio.sample_rate})

    async def open_ear(self) -> None:
        """Open the session's listener on an ASR replica (conversation mode)."""
        if self.ear is not None:
            await self.ear.open()

    async def stop(self, reason: str = "ended") -> None:
        """End the session now for its viewers; `release` frees the stages (it may take longer)."""
        for task in (self.admitter, self.talker, self.watcher, self.turn_task):
            if task is not None:
                task.cancel()
        if self.ear is not None:
            self.ear.stop()
        await self.driver.stop(reason)

    async def release(self) -> None:
        sid = self.spec.session_id
        calls = [self.driver.release(), self.llm.call("close", sid, timeout=RELEASE_TIMEOUT_S)]
        if self.ear is not None:
            calls.append(self.ear.stage.call("close", sid, timeout=RELEASE_TIMEOUT_S))
        await asyncio.gather(*calls, return_exceptions=True)
        if self.placement is not None:  # after the stages: the freed slots must really be free
            await asyncio.gather(self.placement.call("release", sid, timeout=RELEASE_TIMEOUT_S), return_exceptions=True)


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
