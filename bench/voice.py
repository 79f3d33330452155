"""Voice conversation benchmark: `livetalk serve` (toy preset, the embedded chain: silero-vad + pocketsphinx →
SmolLM2 → eSpeak NG) as a real process; recorded questions (eSpeak NG, the test user's voice) sent over the
WebSocket as 16 kHz PCM at real-time pace, as the page's microphone sends them (a message every 0.1 s).

    .venv/bin/python bench/voice.py [--rounds 2] [--barge-ins 4] [--set serve.lead_blocks=1] [--out F.json]

Per question, from the end of the user's speech (the last loud sample sent):
- → final transcript (the end of the turn is `serve.asr.end_silence_ms` of silence, so never sooner than that);
- → the answer queued (the `speech` event: the LLM's first sentence, spoken by Speech);
- → first avatar frame of the answer: the arrival of the first block carrying the answer's speech;
- → first avatar audio: when the page plays that speech (app.js's clock: a block plays 0.25 s after it arrives
  unless the stream is ahead), the latency a user hears.
Barge-in: the avatar reads a long text, the user talks over it; stop time is from the moment VAD can confirm the
speech (its onset + `start_speech_ms`) to the `interrupted` event, on which the page stops the sound.
Recognition: word error rate of the final transcripts against the questions' text.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from livetalk_ray import espeak
from livetalk_ray.cli.serve import served
from livetalk_ray.config import load_config
from livetalk_ray.serving.chaos import SPEECH_LEVEL, Viewer
from livetalk_ray.serving.protocol import pcm16

QUESTIONS = (
    "Do you like music?",
    "Please tell me something interesting.",
    "What should we eat for dinner tonight?",
    "What do you think of the Mona Lisa?",
    "Where would you like to travel next year?",
    "Can you recommend a good book?",
)
USER_VOICE = {"voice": "en-us+f2", "words_per_minute": 140}  # as tests/serving/test_asr.py
RATE, CHUNK_S, PAGE_LEAD_S = 16000, 0.1, 0.25
LONG_TEXT = (
    "Once upon a time there was a dragon who lived on a hill. Every morning it flew over the village. "
    "The children waved and the dragon waved back. One day it brought them a basket of apples."
)
CFG = load_config("toy")


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> int:
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def talk(viewer: Viewer, audio: np.ndarray) -> float:
    """Send at real-time pace; returns when the first chunk went."""
    started, step = time.monotonic(), int(CHUNK_S * RATE)
    for k, i in enumerate(range(0, len(audio), step)):
        viewer.send(pcm16(audio[i : i + step]))
        time.sleep(max(0.0, started + (k + 1) * CHUNK_S - time.monotonic()))
    return started


def wait_for(viewer: Viewer, test, since: float, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in list(viewer.log):
            if r.at >= since and test(r):
                return r
        time.sleep(0.02)
    return None


class PageClock:
    """When the page plays each block (app.js): base + first_frame / fps, the base pushed back when a block would
    play less than 50 ms from now (it then plays `PAGE_LEAD_S` after its arrival)."""

    def __init__(self) -> None:
        self.base: float | None = None
        self.play_at: dict[int, float] = {}

    def follow(self, viewer: Viewer) -> None:
        for r in list(viewer.log):
            if r.kind != "block" or r.detail["index"] in self.play_at:
                continue
            at = r.detail["first_frame"] / r.detail["fps"]
            if self.base is None or self.base + at < r.at + 0.05:
                self.base = r.at + PAGE_LEAD_S - at
            self.play_at[r.detail["index"]] = self.base + at


def ask(viewer: Viewer, clock: PageClock, question: str) -> dict:
    audio = espeak.speak(question, sample_rate=RATE, **USER_VOICE)
    loud = np.flatnonzero(np.abs(audio) > SPEECH_LEVEL)
    started = talk(viewer, np.concatenate([audio, np.zeros(int(1.5 * RATE), np.float32)]))
    speech_end = started + (loud[-1] + 1) / RATE
    heard = wait_for(viewer, lambda r: r.kind == "transcript" and r.detail.get("final"), since=started)
    answered = wait_for(viewer, lambda r: r.kind == "speech", since=started)
    block = answered and wait_for(
        viewer, lambda r: r.kind == "block" and r.detail["speech_at_s"] is not None, since=answered.at
    )
    wait_for(viewer, lambda r: r.kind == "state" and r.detail["state"] == "listening", since=answered.at, timeout=60)
    clock.follow(viewer)
    out = {"question": question, "heard": heard.detail["text"] if heard else None}
    out["errors"], out["words"] = word_errors(question, out["heard"] or ""), len(words(question))
    out["to_transcript_s"] = heard.at - speech_end if heard else None
    out["to_answer_queued_s"] = answered.at - speech_end if answered else None  # + LLM first sentence + Speech
    out["to_frame_s"] = block.at - speech_end if block else None
    played = block and clock.play_at[block.detail["index"]] + block.detail["speech_at_s"]
    out["to_audio_s"] = played - speech_end if block else None
    return out


def barge_in(viewer: Viewer) -> dict:
    viewer.send({"type": "say", "text": LONG_TEXT})
    speaking = wait_for(viewer, lambda r: r.kind == "block" and r.detail["speech_at_s"] is not None, time.monotonic())
    time.sleep(max(0.0, 3.5 - (time.monotonic() - speaking.at)))  # blocks arrive up to lead_blocks early
    audio = espeak.speak("Wait, stop please.", sample_rate=RATE, **USER_VOICE)
    onset = float(np.argmax(np.abs(audio) > SPEECH_LEVEL)) / RATE
    started = talk(viewer, np.concatenate([audio, np.zeros(int(1.5 * RATE), np.float32)]))
    cut = wait_for(viewer, lambda r: r.kind == "interrupted", since=started, timeout=30)
    confirmed = started + onset + CFG.serve.asr.start_speech_ms / 1000
    wait_for(viewer, lambda r: r.kind == "state" and r.detail["state"] == "listening", since=time.monotonic() + 3)
    return {"stop_s": cut.at - confirmed if cut else None, "heard": cut.detail["heard"] if cut else None}


def percentiles(values: list) -> dict:
    got = [v for v in values if v is not None]
    return {q: (round(float(np.percentile(got, int(q[1:]))), 3) if got else None) for q in ("p50", "p99")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2, help="times each question is asked")
    parser.add_argument("--barge-ins", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "voice.json")
    parser.add_argument("--set", action="append", default=[], help="a config override for the server (repeatable)")
    args = parser.parse_args()
    console = Console()
    turns, cuts = [], []
    with served(*(x for item in args.set for x in ("--set", item))) as url:
        session = httpx.post(url + "/v1/sessions", data={"portrait": "ada"}, timeout=120).json()
        viewer = Viewer(url.replace("http", "ws") + session["ws"])
        viewer.send({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": RATE, "channels": 1})
        wait_for(viewer, lambda r: r.kind == "block", since=0)
        time.sleep(2.0)
        clock = PageClock()
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("questions and barge-ins", total=args.rounds * len(QUESTIONS) + args.barge_ins)
            for _ in range(args.rounds):
                for question in QUESTIONS:
                    turns.append(ask(viewer, clock, question))
                    bar.advance(task)
            for _ in range(args.barge_ins):
                cuts.append(barge_in(viewer))
                bar.advance(task)
        viewer.close()
    errors, total = sum(t["errors"] for t in turns), sum(t["words"] for t in turns)
    report = {
        "setup": "livetalk serve, toy preset, embedded chain (silero-vad + pocketsphinx, SmolLM2-135M, eSpeak NG), "
        f"one session, 2 CPU cores; questions in eSpeak NG's {USER_VOICE['voice']} at "
        f"{USER_VOICE['words_per_minute']} wpm, sent in {CHUNK_S:g} s PCM messages at real-time pace",
        "overrides": args.set,
        "end_of_speech_to_final_transcript_s": percentiles([t["to_transcript_s"] for t in turns]),
        "end_of_speech_to_answer_queued_s": percentiles([t["to_answer_queued_s"] for t in turns]),
        "end_of_speech_to_first_avatar_audio_s": percentiles([t["to_audio_s"] for t in turns]),
        "end_of_speech_to_first_avatar_frame_s": percentiles([t["to_frame_s"] for t in turns]),
        "barge_in_stop_s": percentiles([c["stop_s"] for c in cuts]),
        "word_error_rate": round(errors / total, 3),
        "turns": turns,
        "barge_ins": cuts,
    }
    table = Table(title=f"voice: {len(turns)} questions, {len(cuts)} barge-ins (seconds)")
    for column in ("measure", "p50", "p99"):
        table.add_column(column)
    for key in [k for k in report if k.endswith("_s")]:
        table.add_row(key, *(str(v) for v in report[key].values()))
    table.add_row("word error rate", f"{report['word_error_rate']:.1%}", "")
    console.print(table)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
