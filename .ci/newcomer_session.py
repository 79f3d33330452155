"""One live session against a running `livetalk serve`, as the newcomer test needs it: the avatar's first frames
arrive over the WebSocket and it speaks a sentence (PCM with energy under the frames). Exit 0, or 1 and why."""

from __future__ import annotations

import io
import json
import sys
import time

import httpx
import numpy as np
from PIL import Image
from websockets.sync.client import connect

from livetalk_ray.serving.protocol import decode_block

BASE = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
SENTENCE = "Hello! I am speaking from a fresh clone."


def main() -> int:
    started = time.monotonic()
    reply = httpx.post(BASE + "/v1/sessions", data={"portrait": "ada"}, timeout=120)
    if reply.status_code != 201:
        print(f"newcomer: POST /v1/sessions answered {reply.status_code}: {reply.text[:300]}")
        return 1
    session = reply.json()
    frames, spoken, speech_s, first_frame_s = 0, 0.0, None, None
    with connect(BASE.replace("http", "ws", 1) + session["ws"], max_size=None, open_timeout=60) as ws:
        ws.send(json.dumps({"type": "say", "text": SENTENCE}))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (frames >= 24 and speech_s and spoken >= 0.5 * speech_s):
            message = ws.recv(timeout=60)
            if isinstance(message, str):
                event = json.loads(message)
                if event["type"] == "error":
                    print(f"newcomer: error event {event}")
                    return 1
                if event["type"] == "speech":
                    speech_s = event["seconds"]
                continue
            header, jpegs, pcm = decode_block(message)
            Image.open(io.BytesIO(jpegs[0])).verify()  # real JPEG frames
            frames += len(jpegs)
            first_frame_s = first_frame_s or time.monotonic() - started
            if len(pcm) and float(np.sqrt(np.mean(pcm**2))) > 0.01:
                spoken += len(pcm) / header["sample_rate"]
    httpx.delete(BASE + f"/v1/sessions/{session['session_id']}", timeout=60)
    print(
        f"newcomer: {frames} frames, first after {first_frame_s or 0:.1f} s; "
        f"spoke {spoken:.1f} s of a {speech_s or 0:.1f} s sentence"
    )
    return 0 if frames >= 24 and speech_s and spoken >= 0.5 * speech_s else 1


if __name__ == "__main__":
    sys.exit(main())
