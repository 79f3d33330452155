"""Chaos benchmark on loopback: `livetalk serve` (toy preset, shipped weights) as a real process, N paced sessions
for M minutes, and every K seconds all replicas of one random stage killed (Denoiser, VAEDecoder, LLM, Speech,
ASR, Ingress). Each session chats, changes its prompt and uploads audio now and then. After every kill each session
is judged (livetalk_ray/serving/chaos.py): resumed, ended with an error event and a close code, or stalled
(a gap over two block times nobody was told about) or dropped (1006). Ended sessions are replaced.

    .venv/bin/python bench/chaos.py [--sessions 2] [--minutes 5] [--kill-every 30] [--out bench/results/chaos.json]

Also reported: how long the viewers went without frames after a kill (p50/p99), and each replica's memory
before any session, at the peak, and after every session has ended (the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from livetalk_ray.cli.serve import served
from livetalk_ray.config import load_config
from livetalk_ray.serving.chaos import STAGES, Viewer, judge
from livetalk_ray.serving.loadtest import local_replica_memory, local_replicas
from livetalk_ray.serving.protocol import pcm16

BLOCK_S = load_config("toy").block_seconds


def kill_stage(stage: str) -> list[str]:
    """Kill the replicas of one stage of the server's app, from outside its Ray (as an OOM killer would)."""
    killed = []
    for deployment, proc in local_replicas("livetalk"):
        if deployment == stage:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(str(proc.pid))
    return killed


def open_viewer(url: str) -> tuple[str, Viewer] | None:
    try:
        reply = httpx.post(url + "/v1/sessions", data={"portrait": "ada"}, timeout=120)
    except httpx.HTTPError:
        return None
    if reply.status_code != 201:
        return None
    session = reply.json()
    return session["session_id"], Viewer(url.replace("http", "ws") + session["ws"])


def poke(viewer: Viewer, rng: random.Random) -> None:
    """Something a user does now and then: a chat turn, a new prompt, or a few seconds of speech."""
    kind = rng.choice(["chat", "prompt", "audio", "none"])
    try:
        if kind == "chat":
            viewer.send({"type": "chat", "text": "Tell me something nice."})
        elif kind == "prompt":
            viewer.send({"type": "prompt", "text": rng.choice(["A person smiles.", "A person talks calmly."])})
        elif kind == "audio":
            viewer.send({"type": "audio_format", "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1})
            viewer.send(pcm16(0.3 * np.sin(np.linspace(0, 3000, 2 * 16000)).astype(np.float32)))
    except Exception:  # noqa: BLE001 - a viewer whose session just ended; the judge reports it
        pass


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(url: str, args, rng: random.Random, console: Console) -> tuple[list[dict], list[str], dict]:
    """Sessions, pokes and kills for `args.minutes`; a verdict per session per kill, and replica memory."""
    verdicts, kills, memory = [], [], {}
    order = [stage for _ in range(100) for stage in rng.sample(STAGES, len(STAGES))]  # every stage, shuffled
    memory["before"] = local_replica_memory("livetalk")
    peak: dict[str, float] = {}
    live = [v for v in (open_viewer(url) for _ in range(args.sessions)) if v is not None]
    end = time.monotonic() + args.minutes * 60
    next_kill = time.monotonic() + args.kill_every
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{args.sessions} sessions, a kill every {args.kill_every:g} s", total=args.minutes * 60)
        while time.monotonic() < end:
            time.sleep(1.0)
            bar.update(task, completed=args.minutes * 60 - (end - time.monotonic()))
            for stage, mb in local_replica_memory("livetalk").items():
                peak[stage] = max(peak.get(stage, 0.0), mb)
            for _, viewer in live:
                if rng.random() < 0.05:
                    poke(viewer, rng)
            if time.monotonic() < next_kill:
                continue
            stage = order[len(kills)]
            killed_at = time.monotonic()
            if not kill_stage(stage):
                next_kill = time.monotonic() + 2  # its replacement is still starting: try again soon
                continue
            # judged once the sessions had time to resume: the next kill, or the end of the run
            window_end = min(killed_at + args.kill_every, end)
            while time.monotonic() < window_end:
                time.sleep(0.5)
                bar.update(task, completed=args.minutes * 60 - (end - time.monotonic()))
            for _, viewer in live:
                verdicts.append({"stage": stage, **judge(viewer, killed_at, time.monotonic(), BLOCK_S).__dict__})
            kills.append(stage)
            for sid, viewer in [v for v in live if v[1].ended()]:  # replace the sessions that ended
                viewer.close()
                live.remove((sid, viewer))
            while len(live) < args.sessions and (new := open_viewer(url)) is not None:
                live.append(new)
            for _, viewer in live:  # new sessions stream before the next kill
                viewer.wait_blocks(1, since=0, timeout=60)
            next_kill = time.monotonic()
    for sid, viewer in live:
        viewer.close()
        httpx.delete(url + f"/v1/sessions/{sid}", timeout=30)
    time.sleep(5)  # released in the background, then memory trimmed
    memory["peak"], memory["after"] = peak, local_replica_memory("livetalk")
    return verdicts, kills, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--kill-every", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos.json")
    args = parser.parse_args()
    console, rng = Console(), random.Random(args.seed)
    with served() as url:
        try:
            verdicts, kills, memory = run(url, args, rng, console)
        finally:
            stopping = time.monotonic()
    shutdown_s = time.monotonic() - stopping

    counts = {
        k: sum(v["outcome"] == k for v in verdicts) for k in ("resumed", "ended_with_error", "stalled", "dropped")
    }
    silences = [v["longest_silence_s"] for v in verdicts]
    delayed = sum(v["events"].count("delayed") for v in verdicts)
    recoveries = [v["recovery_s"] for v in verdicts if v["recovery_s"] is not None]
    report = {
        "sessions": args.sessions,
        "minutes": args.minutes,
        "kill_every_s": args.kill_every,
        "block_s": BLOCK_S,
        "kills": kills,
        "outcomes": counts,
        "delayed_events": delayed,
        "untold_silence_s": {"p50": percentile(silences, 50), "p99": percentile(silences, 99)},
        "frames_again_after_reprime_s": {"p50": percentile(recoveries, 50), "p99": percentile(recoveries, 99)},
        "memory_mb": memory,
        "sigterm_s": shutdown_s,
        "verdicts": verdicts,
    }
    table = Table(title=f"chaos: {args.sessions} sessions × {args.minutes:g} min, a kill every {args.kill_every:g} s")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("kills", ", ".join(kills))
    for k, n in counts.items():
        table.add_row(k, str(n))
    table.add_row("`delayed` events (told: a block 2 block times late)", str(delayed))
    for name, q in (
        ("untold silence", report["untold_silence_s"]),
        ("frames again", report["frames_again_after_reprime_s"]),
    ):
        table.add_row(f"{name} p50 / p99 (s)", " / ".join("-" if x is None else f"{x:.2f}" for x in q.values()))
    for stage in sorted(memory.get("after", {})):
        row = [memory[k].get(stage) for k in ("before", "peak", "after")]
        table.add_row(f"{stage} MB before/peak/after", " / ".join("-" if x is None else f"{x:.0f}" for x in row))
    table.add_row("SIGTERM → exit (s)", f"{shutdown_s:.1f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if counts["stalled"] or counts["dropped"] else 0)


if __name__ == "__main__":
    main()
