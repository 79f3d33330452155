"""A small OpenAI-compatible server over real HTTP for tests: streamed chat completions (text, or text and pcm16 audio
when the request asks for the audio modality, as gpt-4o-audio and vLLM's Qwen-Omni serving answer) and
`/audio/transcriptions` (multipart WAV in, JSON text out). It records every request it was sent."""

from __future__ import annotations

import base64
import io
import json
import threading
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

AUDIO_RATE = 24000
REPLY = ["Dragons ", "are big. They ", "fly far."]
TRANSCRIPT = "tell me a story about a dragon"


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []
    reply = REPLY  # text deltas (or audio transcript deltas); a test may set its own
    transcript = TRANSCRIPT

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.endswith("/audio/transcriptions"):
            self._transcribe(raw)
        elif self.path.endswith("/chat/completions"):
            self._chat(json.loads(raw))
        else:
            self.send_error(404)

    def _transcribe(self, raw: bytes) -> None:
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        fields = {}
        for part in BytesParser(policy=default).parsebytes(head + raw).iter_parts():
            fields[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
        with wave.open(io.BytesIO(fields["file"])) as w:
            seconds = w.getnframes() / w.getframerate()
        self.requests.append({"path": self.path, "fields": {k: v for k, v in fields.items() if k != "file"}})
        self.requests[-1]["seconds"] = seconds
        self._json({"text": self.transcript})

    def _chat(self, body: dict) -> None:
        self.requests.append({"path": self.path, "body": body})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        speak = "audio" in (body.get("modalities") or [])
        for piece in self.reply:
            if speak:  # 0.25 s of a tone per piece, with the piece's words as the transcript delta
                tone = (0.2 * np.sin(np.arange(AUDIO_RATE // 4) / 5) * 32767).astype("<i2").tobytes()
                delta = {"audio": {"data": base64.b64encode(tone).decode(), "transcript": piece}}
            else:
                delta = {"content": piece}
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def fake_openai() -> Iterator[str]:
    """The server's base URL (`http://127.0.0.1:PORT/v1`), listening on loopback until the block ends."""
    FakeOpenAI.requests, FakeOpenAI.reply, FakeOpenAI.transcript = [], REPLY, TRANSCRIPT  # what earlier tests set
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
