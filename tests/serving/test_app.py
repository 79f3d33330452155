"""The whole app on a real local Ray Serve: sessions over HTTP and WebSocket, speech in the stream, every
bad input answered with a clear 4xx or error event, a viewer that does not read dropped without slowing the
others, and DELETE at once (replica kills: test_chaos.py)."""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from livetalk_ray.serving.protocol import decode_block
from tests.serving.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def open_session(url, **form) -> dict:
    reply = httpx.post(url + "/v1/sessions", data={"portrait": "ada", **form}, headers=AUTH, timeout=120)
    assert reply.status_code == 201, reply.text
    return reply.json()


def ws_url(url, session) -> str:
    return url.replace("http", "ws") + session["ws"] + f"?token={TOKEN}"


def read(ws, *, blocks: int, timeout: float = 120) -> tuple[list, list]:
    got_blocks, events, deadline = [], [], time.monotonic() + timeout
    while len(got_blocks) < blocks:
        message = ws.recv(timeout=max(deadline - time.monotonic(), 0.1))
        if isinstance(message, bytes):
            got_blocks.append(decode_block(message))
        else:
            events.append(json.loads(message))
    return got_blocks, events


def test_page_health_and_openapi(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}  # nothing about sessions for anyone
    assert "<canvas" in httpx.get(server + "/").text and "onBlock" in httpx.get(server + "/app.js").text
    for path in ("/openapi.json", "/docs"):  # with a token set, the API description needs it too
        assert httpx.get(server + path).status_code == 401
    paths = httpx.get(server + "/openapi.json", headers=AUTH).json()["paths"]
    assert {"/v1/sessions", "/v1/sessions/{session_id}", "/v1/sessions/{session_id}/stream"} <= set(paths)


def test_a_session_streams_blocks_and_speaks_what_it_is_told(server):
    session = open_session(server)
    with connect(ws_url(server, session)) as ws:
        blocks, events = read(ws, blocks=2)
        assert any(e["type"] == "first_frame" for e in events)
        header, jpegs, pcm = blocks[0]
        assert header["first_frame"] == 0 and len(jpegs) == 9
        assert Image.open(io.BytesIO(jpegs[0])).size == (64, 64)
        assert np.abs(pcm).max() == 0  # nobody has spoken yet: silence
        ws.send(json.dumps({"type": "say", "text": "Hello there, nice to meet you."}))
        spoken, deadline = False, time.monotonic() + 120
        while not spoken and time.monotonic() < deadline:
            blocks, events = read(ws, blocks=1)
            spoken = np.abs(blocks[0][2]).max() > 0.05
        assert spoken, "the speech never reached the stream"
    status = httpx.get(server + f"/v1/sessions/{session['session_id']}", headers=AUTH).json()
    assert status["blocks"] >= 3
    assert httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH).json()["released"]
    assert httpx.get(server + f"/v1/sessions/{session['session_id']}", headers=AUTH).status_code == 404


def test_chat_turns_come_back_as_transcripts(server):
    session = open_session(server, persona="a geography teacher")
    with connect(ws_url(server, session)) as ws:
        ws.send(json.dumps({"type": "chat", "text": "What is the capital of France?"}))
        roles, deadline = set(), time.monotonic() + 240
        while "assistant" not in roles and time.monotonic() < deadline:
            message = ws.recv(timeout=240)
            if isinstance(message, str) and json.loads(message)["type"] == "transcript":
                roles.add(json.loads(message)["role"])
        assert roles == {"user", "assistant"}
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def test_the_mjpeg_stream_serves_jpeg_frames(server):
    session = open_session(server)
    with httpx.stream("GET", server + session["stream"], headers=AUTH, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("multipart/x-mixed-replace")
        data = b""
        for chunk in reply.iter_bytes():
            data += chunk
            if data.count(b"\xff\xd9") >= 3:  # three JPEG end markers
                break
    assert data.startswith(b"--frame") and b"Content-Type: image/jpeg" in data
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def png(size=(64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("files", "data", "headers", "status", "words"),
    [
        ({"image": ("a.png", png(), "image/png")}, {}, {}, 401, "token"),
        ({"image": ("a.png", png(), "image/png")}, {}, {"Authorization": "Bearer wrong"}, 401, "token"),
        ({"image": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")}, {}, AUTH, 413, "larger than"),
        ({"image": ("notes.txt", b"just some text", "text/plain")}, {}, AUTH, 415, "not a PNG, JPEG"),
        ({"image": ("cut.png", png((64, 64))[:80], "image/png")}, {}, AUTH, 415, "cannot read"),
        ({"image": ("tiny.png", png((4, 4)), "image/png")}, {}, AUTH, 400, "too small"),
        # An aspect-ratio bomb: 24 KB and under the pixel cap, but covering a square from it costs gigabytes.
        ({"image": ("thin.png", png((1048576, 8)), "image/png")}, {}, AUTH, 400, "longer than 8192"),
        ({"image": ("strip.png", png((8000, 8)), "image/png")}, {}, AUTH, 400, "times as wide"),
        ({"image": ("long.png", png((8300, 1100)), "image/png")}, {}, AUTH, 400, "longer than 8192"),
        # Refused before the body is read (a middleware), whatever it holds.
        ({"image": ("big.png", b"0" * 300_000, "image/png")}, {}, {}, 401, "token"),
        (None, {"portrait": "nobody"}, AUTH, 400, "unknown portrait"),
        (None, {}, AUTH, 400, "exactly one"),
        ({"image": ("a.png", png(), "image/png")}, {"portrait": "ada"}, AUTH, 400, "exactly one"),
    ],
)
def test_bad_session_requests_get_a_clear_4xx(server, files, data, headers, status, words):
    reply = httpx.post(server + "/v1/sessions", files=files, data=data, headers=headers, timeout=60)
    assert reply.status_code == status, reply.text
    assert words in reply.json()["detail"] and " 0x" not in reply.json()["detail"]  # no heap address
    assert httpx.get(server + "/healthz").status_code == 200


def test_the_token_is_in_no_store_ray_lets_anyone_read(server):
    """Serve keeps every deployment's arguments in Ray's key-value store: the replicas get a digest, not the token."""
    from ray.experimental import internal_kv

    seen = 0
    for namespace in ("serve", "", None):
        for key in internal_kv._internal_kv_list("", namespace=namespace):
            value = internal_kv._internal_kv_get(key, namespace=namespace) or b""
            assert TOKEN.encode() not in value, key
            seen += 1
    assert seen > 0  # Serve's checkpoints were there to read
    listing = httpx.get(server + "/v1/portraits", headers=AUTH)  # the digest still lets it in
    assert listing.status_code == 200 and "toy-world portraits" in listing.json()["model"]  # the page says it


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**70), "abc"])
def test_seeds_outside_0_to_2_63_are_422(server, seed):
    reply = httpx.post(server + "/v1/sessions", data={"portrait": "ada", "seed": seed}, headers=AUTH, timeout=60)
    assert reply.status_code == 422 and "seed" in reply.text


def test_any_token_bytes_are_a_plain_401(server):
    for value in ("Bearer caf\u00e9".encode("latin-1"), b"Bearer \xff\xfe", "Bearer ünïcödé".encode()):
        reply = httpx.get(server + "/v1/portraits", headers={"Authorization": value})
        assert reply.status_code == 401, reply.text
    assert httpx.get(server + "/v1/portraits", params={"token": "ünïcödé"}).status_code == 401
    with pytest.raises(ConnectionClosed) as closed:
        with connect(server.replace("http", "ws") + "/v1/sessions/x/ws?token=%C3%BC%FF") as ws:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4401


def test_websockets_from_foreign_pages_are_refused(server):
    session = open_session(server)
    with pytest.raises(ConnectionClosed) as closed:
        with connect(ws_url(server, session), additional_headers={"Origin": "https://evil.example"}) as ws:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4403
    with connect(ws_url(server, session), additional_headers={"Origin": server}) as ws:  # the page's own origin
        blocks, _ = read(ws, blocks=1)
        assert blocks
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def test_queued_speech_is_bounded_with_a_busy_event(server):
    session = open_session(server, mode="puppet")  # its audio moves the lips: speech queued to be mouthed
    ten_seconds = (0.1 * np.sin(np.arange(160_000) / 8)).astype("<i2").tobytes()  # under the 10 s message cap
    with connect(ws_url(server, session)) as ws:
        ws.send(json.dumps({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}))
        for _ in range(8):  # 80 s against a 60 s backlog limit, at 5 messages/s
            ws.send(ten_seconds)
        busy, deadline = [], time.monotonic() + 60
        while not busy and time.monotonic() < deadline:
            message = ws.recv(timeout=60)
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                event = json.loads(message)
                assert event["code"] == "busy", event
                busy.append(event["message"])
        assert busy and "limit 60 s" in busy[0]
        blocks, _ = read(ws, blocks=1)  # the session goes on
        assert blocks
    status = httpx.get(server + f"/v1/sessions/{session['session_id']}", headers=AUTH).json()
    assert status["queued_speech_s"] <= 60.0
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def test_unknown_sessions_and_missing_tokens_are_refused(server):
    assert httpx.get(server + "/v1/sessions/nope", headers=AUTH).status_code == 404
    assert httpx.delete(server + "/v1/sessions/nope", headers=AUTH).status_code == 404
    with (
        pytest.raises(ConnectionClosed) as closed,
        connect(server.replace("http", "ws") + f"/v1/sessions/nope/ws?token={TOKEN}") as ws,
    ):
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4404
    session = open_session(server)
    with pytest.raises(ConnectionClosed) as closed, connect(server.replace("http", "ws") + session["ws"]) as ws:
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4401
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def test_bad_websocket_messages_get_error_events_and_the_session_goes_on(server):
    session = open_session(server)
    bad = [
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"type": "dance"}),
        json.dumps({"type": "say", "text": ""}),
        json.dumps({"type": "say", "text": "x" * 5000}),
        json.dumps({"type": "audio_format", "encoding": "mp3", "sample_rate": 16000, "channels": 1}),
        "[" * 3000 + "]" * 3000,  # within the size limit, deeper than any parser should follow
        "[" * 100_000,  # past the size limit
    ]
    with connect(ws_url(server, session)) as ws:
        for message in bad:
            ws.send(message)
        ws.send(b"\x00\x01\x02")  # PCM before any audio_format
        ws.send(json.dumps({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": 44100, "channels": 1}))
        ws.send(b"\x00\x01" * 100)  # declared 44.1 kHz: refused
        errors, deadline = [], time.monotonic() + 60
        while len(errors) < len(bad) + 2 and time.monotonic() < deadline:
            message = ws.recv(timeout=60)
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                errors.append(json.loads(message)["message"])
        assert len(errors) == len(bad) + 2, errors
        assert "malformed JSON" in errors[0] and "unknown message type" in errors[2]
        assert any("nested too deeply" in e for e in errors) and any("at most" in e for e in errors)
        assert any("audio_format" in e for e in errors) and any("16000 Hz" in e for e in errors)
        blocks, _ = read(ws, blocks=1)  # still streaming
        assert blocks
    httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def events_until_closed(ws) -> tuple[list[dict], int | None]:
    """The JSON events a WebSocket still receives, and the close code it ends with (None: no close frame)."""
    events = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = ws.recv(timeout=30)
            if isinstance(message, str):
                events.append(json.loads(message))
    return events, closed.value.rcvd.code if closed.value.rcvd is not None else None


def test_a_viewer_that_does_not_read_is_dropped_and_the_others_keep_real_time(server):
    session = open_session(server)
    stuck = connect(ws_url(server, session), max_size=None)  # never reads
    try:
        with connect(ws_url(server, session), max_size=None) as ws:
            read(ws, blocks=1)
            started, blocks = time.monotonic(), 0
            while time.monotonic() - started < 40:
                message = ws.recv(timeout=30)
                blocks += isinstance(message, bytes)
            # paced at one block per 0.75 s: the stuck viewer held nothing back
            assert blocks >= 0.7 * 40 / 0.75, blocks
        # The stuck one was dropped, not followed: it holds what its socket buffered, then the connection is closed
        # (4408, or no close frame: a closing handshake cannot pass the data it never read).
        got = 0
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got += isinstance(stuck.recv(timeout=30), bytes)
        assert got < blocks, (got, blocks)
        assert closed.value.rcvd is None or closed.value.rcvd.code == 4408
    finally:
        stuck.close()
        httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)


def test_delete_is_immediate_and_viewers_get_closed_with_1000(server):
    session = open_session(server)
    with connect(ws_url(server, session)) as ws:
        read(ws, blocks=2)
        started = time.monotonic()
        reply = httpx.delete(server + f"/v1/sessions/{session['session_id']}", headers=AUTH)
        took = time.monotonic() - started
        assert reply.status_code == 200 and took < 1.0, (reply.text, took)
        events, code = events_until_closed(ws)
        assert events[-1] == {"type": "closed", "reason": "ended"} and code == 1000
    assert httpx.get(server + f"/v1/sessions/{session['session_id']}", headers=AUTH).status_code == 404
