"""Serving benchmark, side by side in one run, toy preset with the shipped weights, unpaced streams (the
pacing that keeps a live stream at real time is switched off: this measures capacity).

    .venv/bin/python bench/serve.py [--blocks 16] [--out bench/results/serve.json]

- in-process: one AvatarStream, denoise and decode one after the other in this process;
- through Serve: POST a session, read its WebSocket; blocks 2..N give the FPS, the first block the TTFF
  (from the POST, so it includes priming the session) against the in-process first-block compute
  (priming + denoise + decode of block 0);
- pipelined (2 blocks in flight, decode k ‖ denoise k+1) vs sequential (1), each its own deployment;
- 4 concurrent sessions vs 1: aggregate FPS.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def in_process(cfg, blocks: int) -> dict:
    from livetalk_ray.assets import with_embedded_weights
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.models.image import decode_reference_image
    from livetalk_ray.serving.portraits import portrait_png

    cfg, checkpoint = with_embedded_weights(cfg, None)
    pipe = AvatarPipeline(cfg, checkpoint)
    ref = decode_reference_image(portrait_png("ada"), cfg.video.height, cfg.video.width)
    start = time.perf_counter()
    stream = pipe.open_stream(ref, "A person talks to the camera.", seed=0)
    frames = len(stream.next_block().frames)
    first = time.perf_counter() - start
    steady_start, steady_frames = time.perf_counter(), 0
    for _ in range(blocks - 1):
        steady_frames += len(stream.next_block().frames)
    return {"fps": steady_frames / (time.perf_counter() - steady_start), "first_block_s": first, "frames": frames}


def one_session(base: str, blocks: int, results: list, index: int) -> None:
    from websockets.sync.client import connect

    from livetalk_ray.serving.protocol import decode_block

    t0 = time.perf_counter()
    reply = httpx.post(base + "/v1/sessions", data={"portrait": "ada"}, timeout=300).json()
    arrivals, frames = [], []
    with connect(base.replace("http", "ws") + reply["ws"], max_size=None) as ws:
        while len(arrivals) < blocks:
            message = ws.recv(timeout=300)
            if isinstance(message, bytes):
                arrivals.append(time.perf_counter())
                frames.append(len(decode_block(message)[1]))
    httpx.delete(base + f"/v1/sessions/{reply['session_id']}", timeout=60)
    results[index] = {"ttff_s": arrivals[0] - t0, "arrivals": arrivals, "frames": frames}


def through_serve(cfg, blocks: int, sessions: int, port: int) -> dict:
    from ray import serve

    from livetalk_ray.serving.app import build_app

    serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    one_session(base, 3, [None], 0)  # warm-up: first calls load kernels and caches
    results: list = [None] * sessions
    threads = [threading.Thread(target=one_session, args=(base, blocks, results, i)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serve.delete("bench")
    # steady state: frames after each session's first block, over the span they arrived in
    start = max(r["arrivals"][0] for r in results)
    end = min(r["arrivals"][-1] for r in results)
    counted = sum(sum(f for a, f in zip(r["arrivals"], r["frames"], strict=True) if start < a <= end) for r in results)
    per_session_gaps = np.concatenate([np.diff(r["arrivals"][1:]) for r in results])
    return {
        "fps": counted / max(end - start, 1e-9),
        "ttff_s": float(np.median([r["ttff_s"] for r in results])),
        "gap_p50_s": float(np.percentile(per_session_gaps, 50)),
        "gap_p99_s": float(np.percentile(per_session_gaps, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from livetalk_ray.config import load_config

    torch.set_num_threads(1)  # the same per-process threads as a Serve replica on a 2-core machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unpaced = ["serve.lead_blocks=100000"]
    cfg = load_config("toy", overrides=unpaced)
    local = in_process(cfg, args.blocks)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        piped = through_serve(cfg, args.blocks, 1, port)
        sequential = through_serve(
            load_config("toy", overrides=[*unpaced, "serve.blocks_in_flight=1"]), args.blocks, 1, port
        )
        four = through_serve(cfg, args.blocks, 4, port)
    finally:
        serve.shutdown()
        ray.shutdown()
    ratios = {
        "serve_fps_over_in_process": piped["fps"] / local["fps"],
        "pipelined_over_sequential": piped["fps"] / sequential["fps"],
        "serve_ttff_over_first_block_compute": piped["ttff_s"] / local["first_block_s"],
        "four_sessions_over_one": four["fps"] / piped["fps"],
    }
    goals = {
        "serve_fps_over_in_process": (">=", 0.9),
        "pipelined_over_sequential": (">=", 1.4),
        "serve_ttff_over_first_block_compute": ("<=", 1.3),
        "four_sessions_over_one": (">=", 1.5),
    }
    table = Table(title="serving, toy preset, 2 CPU cores")
    for col in ("measure", "value", "goal", "met"):
        table.add_column(col)
    table.add_row("in-process FPS", f"{local['fps']:.1f}", "", "")
    table.add_row("in-process first block s", f"{local['first_block_s']:.3f}", "", "")
    for name, r in (("Serve 1 session", piped), ("Serve sequential", sequential), ("Serve 4 sessions", four)):
        table.add_row(f"{name} FPS", f"{r['fps']:.1f}", "", "")
        table.add_row(
            f"{name} TTFF s / gap p50, p99 s", f"{r['ttff_s']:.3f} / {r['gap_p50_s']:.3f}, {r['gap_p99_s']:.3f}", "", ""
        )
    met = {}
    for name, value in ratios.items():
        op, goal = goals[name]
        met[name] = value >= goal if op == ">=" else value <= goal
        table.add_row(name, f"{value:.2f}", f"{op} {goal}", "yes" if met[name] else "no")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "in_process": local,
        "serve_1": piped,
        "serve_sequential": sequential,
        "serve_4": four,
        "ratios": ratios,
        "met": met,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
