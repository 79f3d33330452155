"""Wire formats shared by the ingress, the session driver, tests and the web page (static/app.js).

Server → client, per block, one binary WebSocket message:

    [4 bytes: header length N, big-endian] [N bytes: header JSON, UTF-8] [JPEG 0] [JPEG 1] ... [PCM]

The header is `{"type": "block", "index", "first_frame", "fps", "sample_rate", "jpeg_sizes": [...],
"pcm_samples", "timings"}`; the PCM is signed 16-bit little-endian mono audio under exactly these frames,
so a player that schedules both at `first_frame / fps` keeps them in sync. Everything else (events, errors)
travels as JSON text messages `{"type": ..., ...}`.

When a stage loses the session, the client hears it at once: `{"type": "reprimed", "stage", "reason", "count"}`
when the video stream is re-primed from the reference image (frames follow once a replica holds it again; frame
numbering goes on), `{"type": "recovering", "stage", "reason"}` when a chat turn waits for a new LLM or Speech
replica (the video goes on), and `{"type": "delayed", "waiting_for": STAGE, "seconds"}` when the next block is
more than two block times late (a slow or starting replica; once per late block).

Errors are `{"type": "error", "code": CODE, "message": ..., "incident": ID}`: CODE is one of `ERROR_CODES`, the
message is short and safe to show, and an incident id (on failures of the server, not of the client) names the
server log line that holds the details. After a session's last event `{"type": "closed", "reason": CODE}` the
server closes the WebSocket with one of `CLOSE_CODES`.

Conversation (serving/live.py, serving/conversation.py): `{"type": "state", "state": "listening" | "thinking" |
"speaking"}` first thing on connecting (with the session's `mode`), then whenever the avatar's state changes;
`{"type": "transcript", "role": "user" | "assistant", "text", "final"}` for what was heard (partial ones while the
user speaks, `final: true` at the end of the turn, `cut: true` when a monologue was cut) and what the avatar says;
`{"type": "interrupted", "from_block": K, "heard"}` when the user talked over the avatar: the sound of blocks K and
later is void (stop playing it; their frames may still be shown), and `heard` is the part of the answer the user
heard, which is all the chat remembers of it. When the ASR stage loses the session, `recovering` (stage ASR) and a
`not_heard` error come at once and `{"type": "recovered", "stage": "ASR"}` once the user is heard again.

Client → server: JSON text `{"type": "chat" | "say" | "prompt", "text": ...}`, `{"type": "audio_format",
"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}`, and binary messages of PCM in that format: in
conversation mode (the default) the avatar listens to it; in puppet mode it moves the avatar's lips.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct

import numpy as np

AUDIO_ENCODING = "pcm_s16le"

ERROR_CODES = {
    # the client's doing: the session goes on
    "bad_message": "a message the server cannot use (malformed, unknown type, too long, too fast)",
    "busy": "too much is waiting already (queued speech, chat turns, audio to hear); send it later",
    "no_speech": "the client's audio was muted (zeros) for serve.asr.silence_notice_s: a muted or dead microphone",
    "turn_too_long": "the user spoke past serve.asr.max_turn_s without a pause; the avatar answers at the next pause",
    # the server's: the session goes on
    "turn_failed": "one chat turn could not be answered or spoken; later turns are tried afresh",
    "not_heard": "speech that arrived while the ASR stage was restarting was not heard; say it again",
    # the session ends after these
    "session_lost": "a stage lost the session more often than serve.max_reprimes allows, or could not re-prime it",
    "too_slow": "this viewer read too slowly and was dropped (other viewers go on)",
    "server_shutdown": "the server is stopping",
    "internal": "a bug; the incident id names the server log line with the details",
}
CLOSE_CODES = {
    1000: "the session ended: DELETE, idle timeout, or this viewer asked to close",
    1001: "the server is stopping (code server_shutdown)",
    1011: "the session ended with an error event (its code says why)",
    4401: "missing or wrong token",
    4403: "the page's origin is not allowed (serve.allowed_origins)",
    4404: "unknown session (never existed, or released)",
    4408: "this viewer fell too far behind the stream (code too_slow)",
    4410: "the session has already ended",
}
log = logging.getLogger("livetalk_ray.serving")


def error_event(code: str, message: str, *, session_id: str = "", exc: BaseException | None = None) -> dict:
    """An error event for a client. With `exc` (a failure of the server), its details go to the server log under a
    fresh incident id that the event carries; the client sees no traceback, path, address or actor id."""
    assert code in ERROR_CODES, code
    event = {"type": "error", "code": code, "message": message}
    if exc is not None:
        event["incident"] = secrets.token_hex(6)
        log.error("incident %s (session %s, %s): %s", event["incident"], session_id, code, message, exc_info=exc)
    return event


def close_code(event: dict) -> int:
    """The WebSocket close code after a session's `closed` event."""
    reason = event.get("reason", "ended")
    return {"ended": 1000, "server_shutdown": 1001, "too_slow": 4408, "already_ended": 4410}.get(reason, 1011)


class ProtocolError(ValueError):
    """A client message the server cannot use; the message goes back to the client as an error event."""


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()


def encode_block(header: dict, jpegs: list[bytes], samples: np.ndarray) -> bytes:
    head = json.dumps(
        {"type": "block", **header, "jpeg_sizes": [len(j) for j in jpegs], "pcm_samples": len(samples)}
    ).encode()
    return b"".join([struct.pack(">I", len(head)), head, *jpegs, pcm16(samples)])


def decode_block(message: bytes) -> tuple[dict, list[bytes], np.ndarray]:
    """The inverse of `encode_block` (tests and Python clients)."""
    (n,) = struct.unpack(">I", message[:4])
    header = json.loads(message[4 : 4 + n])
    offset, jpegs = 4 + n, []
    for size in header["jpeg_sizes"]:
        jpegs.append(message[offset : offset + size])
        offset += size
    pcm = np.frombuffer(message[offset:], dtype="<i2").astype(np.float32) / 32767
    return header, jpegs, pcm


def parse_client_text(raw: str, max_chars: int) -> dict:
    """Validate one JSON text message from a client: bounded in size before parsing, and in depth."""
    limit = 6 * max_chars + 1024  # the longest text, every character \u-escaped, plus the other fields
    if len(raw) > limit:
        raise ProtocolError(f"a text message may hold at most {limit} characters, got {len(raw)}")
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a message must be a JSON object with a string "type"')
    kind = message["type"]
    if kind in ("chat", "say", "prompt"):
        text = message.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(f'"{kind}" needs a non-empty string "text"')
        if len(text) > max_chars:
            raise ProtocolError(f'"text" is {len(text)} characters; the limit is {max_chars}')
        return {"type": kind, "text": text.strip()}
    if kind == "audio_format":
        wanted = {"encoding": AUDIO_ENCODING, "channels": 1}
        got = {k: message.get(k) for k in ("encoding", "sample_rate", "channels")}
        if any(got[k] != v for k, v in wanted.items()):
            raise ProtocolError(f"unsupported audio format {got}; send {AUDIO_ENCODING}, 1 channel")
        return {"type": kind, "sample_rate": got["sample_rate"]}
    raise ProtocolError(f"unknown message type {kind!r}; expected chat, say, prompt or audio_format")


def parse_client_audio(data: bytes, sample_rate: int | None, expected_rate: int, max_seconds: float) -> np.ndarray:
    """Binary PCM from a client → float32 samples at the model's rate."""
    if sample_rate is None:
        raise ProtocolError('send {"type": "audio_format", ...} before binary audio')
    if sample_rate != expected_rate:
        raise ProtocolError(f"audio must be {expected_rate} Hz, the declared format says {sample_rate} Hz")
    if len(data) % 2:
        raise ProtocolError(f"{AUDIO_ENCODING} audio has an even number of bytes, got {len(data)}")
    if len(data) / 2 / expected_rate > max_seconds:
        raise ProtocolError(f"one audio message may hold at most {max_seconds:g} s")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
