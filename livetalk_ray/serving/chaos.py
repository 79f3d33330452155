"""Chaos tools for a running app (tests/serving/test_chaos.py, bench/chaos.py): kill a stage's replicas, watch
sessions over their WebSockets, and judge what each viewer went through.

A session passes when, from the kill until the failure has visibly passed (see `judge`), every gap in what its
viewer receives (blocks and events) is at most `2 × block time` (+ `slack_s` for a loaded machine), unless a
`reprimed` or `delayed` event opened the gap (the client was told; the gap may then last until a replacement
replica has loaded),
and when the session ends only with an `error` event and a `closed` event before a close code other than 1006
(no close frame). A gap that breaks this is a silent stall.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from livetalk_ray.serving.protocol import decode_block

STAGES = ("Denoiser", "VAEDecoder", "LLM", "Speech", "ASR", "Ingress")
RESUMED_BLOCKS = 4  # blocks after a kill, with no event, that show a stream was not hit (in-flight ones included)


def kill_replicas(stage: str, app: str = "livetalk") -> list[str]:
    """Kill every replica of one deployment of `app` (as a crash would: Serve starts replacements)."""
    import ray

    killed = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{stage}#"):
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                killed.append(actor["name"])
            except ValueError:  # died meanwhile
                pass
    return killed


SPEECH_LEVEL = 0.03  # a block whose sound reaches this is speaking (the stream is silent, or speech, nothing else)


def block_detail(header: dict, pcm: np.ndarray) -> dict:
    """What a viewer keeps of a block: its place in the stream, how loud it is, and where speech starts in it."""
    loud = np.flatnonzero(np.abs(pcm) >= SPEECH_LEVEL)
    return {
        "index": header["index"],
        "first_frame": header["first_frame"],
        "fps": header["fps"],
        "loud": float(np.abs(pcm).max(initial=0.0)),
        "speech_at_s": float(loud[0]) / header["sample_rate"] if len(loud) else None,
    }


@dataclass
class Received:
    at: float
    kind: str  # "block" | an event type | "close"
    detail: dict = field(default_factory=dict)


class Viewer:
    """A WebSocket client in a thread: records every block and event with its arrival time, and how it closed."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, close_timeout=2)
        self.log: list[Received] = []
        self.close_code: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                message = self.ws.recv()
                now = time.monotonic()
                if isinstance(message, bytes):
                    header, _, pcm = decode_block(message)
                    self.log.append(Received(now, "block", block_detail(header, pcm)))
                else:
                    event = json.loads(message)
                    self.log.append(Received(now, event["type"], event))
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006
            self.log.append(Received(time.monotonic(), "close", {"code": self.close_code}))

    def send(self, message: dict | bytes) -> None:
        self.ws.send(message if isinstance(message, bytes) else json.dumps(message))

    def blocks_since(self, t: float) -> int:
        return sum(1 for r in list(self.log) if r.kind == "block" and r.at >= t)

    def wait_blocks(self, n: int, since: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.blocks_since(since) >= n:
                return True
            if self.ended():
                return False
            time.sleep(0.05)
        return False

    def ended(self) -> bool:
        return self.close_code is not None

    def close(self) -> None:
        self.ws.close()
        self.thread.join(timeout=5)


@dataclass
class Verdict:
    outcome: str  # "resumed" | "ended_with_error" | "stalled" | "dropped" (closed without a frame: 1006)
    longest_silence_s: float  # the longest gap nobody was told about
    silence_at_s: float  # where it began, seconds after the kill
    recovery_s: float | None  # from the first `reprimed` to the next block, if there was one
    events: list[str]


def judge(viewer: Viewer, since: float, until: float, block_s: float, slack_s: float = 0.5) -> Verdict:
    """What the viewer saw between `since` (a kill) and `until`, judged until the failure has visibly passed: the
    first block after a `reprimed` event, or RESUMED_BLOCKS blocks with no event at all (the stream went on). A
    session that had no frame yet when the kill came is judged from its first frame."""
    first = next((r.at for r in list(viewer.log) if r.kind == "block"), None)
    since = max(since, first) if first is not None else since
    log = [r for r in list(viewer.log) if since <= r.at <= until]
    events = [r.kind for r in log if r.kind != "block"]
    allowed = 2 * block_s + slack_s
    longest, longest_at, last, told, recovery, reprimed_at, blocks = 0.0, 0.0, since, False, None, None, 0
    for r in log:
        if not told and r.at - last > longest:
            longest, longest_at = r.at - last, last - since
        if r.kind in ("reprimed", "delayed", "error", "closed"):
            told = True
            if r.kind == "reprimed":
                reprimed_at = reprimed_at or r.at
        elif r.kind == "block":
            blocks, told = blocks + 1, False
            if reprimed_at is not None:
                recovery = r.at - reprimed_at
                break
            if blocks >= RESUMED_BLOCKS:
                break
        last = r.at
    else:
        if not told and until - last > longest and recovery is None:
            longest, longest_at = until - last, last - since
    if viewer.ended() and viewer.close_code is not None and viewer.log[-1].at <= until:
        if viewer.close_code == 1006:
            return Verdict("dropped", longest, longest_at, recovery, events)
        ended_well = "error" in events and "closed" in events  # told why, then told it is over
        return Verdict("ended_with_error" if ended_well else "dropped", longest, longest_at, recovery, events)
    if longest > allowed:
        return Verdict("stalled", longest, longest_at, recovery, events)
    return Verdict("resumed", longest, longest_at, recovery, events)
