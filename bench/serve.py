"""Serving benchmark, side by side in one run, toy preset with the shipped weights, unpaced streams (the
pacing that keeps a live stream at real time is switched off: this measures capacity).

    .venv/bin/python bench/serve.py [--blocks 24] [--rounds 3] [--set vae.decoder=tiny] [--out bench/results/serve.json]

- in-process: one AvatarStream, denoise and decode one after the other in this process;
- through Serve: POST a session, read its WebSocket; blocks 2..N give the FPS, the first block the TTFF
  (from the POST, so it includes priming the session) against the in-process first-block compute
  (priming + denoise + decode of block 0);
- pipelined (2 blocks in flight, decode k ‖ denoise k+1) vs sequential (1): two apps deployed side by side;
- 4 concurrent sessions vs 1: aggregate FPS, and the mean batch the Denoiser computed (cross-session batching);
- every measurement repeats in `--rounds` interleaved rounds and the medians are compared.

Replicas compute on one thread each (Ray gives a 0.5-CPU actor OMP_NUM_THREADS=1); the in-process run is
pinned to one thread to match.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: oneDNN sizes its pool from it

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

# The decode is ~85 % of a toy block's compute and a replica computes on one thread, so on 2 cores the
# second core serves sessions only through a second VAEDecoder replica (sessions spread over both by the
# hash ring). One session uses one of them; the same deployment serves every run.
# Reservations are logical: 0.1 CPU each lets both apps' replicas fit the 2 logical CPUs (every replica
# still computes on one thread).
SMALL = {"ray_actor_options": {"num_cpus": 0.1}}
DEPLOYMENT = {
    "VAEDecoder": {**SMALL, "num_replicas": 2},
    **{n: SMALL for n in ("Denoiser", "LLM", "Speech", "ASR", "Ingress")},
}
ORIGIN = ""  # http://127.0.0.1:<port>, set by main
TTFF_PROBES = 5  # fresh sessions per round for the first-block latency (in process and through Serve)


def in_process(cfg, blocks: int) -> dict:
    from livetalk_ray.assets import with_embedded_weights
    from livetalk_ray.diffusion.pipeline import AvatarPipeline
    from livetalk_ray.models.image import decode_reference_image
    from livetalk_ray.serving.portraits import portrait_png

    cfg, checkpoint = with_embedded_weights(cfg, None)
    pipe = AvatarPipeline(cfg, checkpoint)
    ref = decode_reference_image(portrait_png("ada"), cfg.video.height, cfg.video.width)
    firsts = []
    for seed in range(TTFF_PROBES):
        start = time.perf_counter()
        stream = pipe.open_stream(ref, "A person talks to the camera.", seed=seed)
        frames = len(stream.next_block().frames)
        firsts.append(time.perf_counter() - start)
    first = float(np.median(firsts))
    steady_start, steady_frames, denoise_s, decode_s = time.perf_counter(), 0, [], []
    for _ in range(blocks - 1):
        block = stream.next_block()
        steady_frames += len(block.frames)
        denoise_s.append(block.timings["total"] - block.timings["decode"])
        decode_s.append(block.timings["decode"])
    denoise, decode = float(np.median(denoise_s)), float(np.median(decode_s))
    return {
        "fps": steady_frames / (time.perf_counter() - steady_start),
        "first_block_s": first,
        "frames": frames,
        "denoise_block_s": denoise,
        "decode_block_s": decode,
        # what overlapping the two stages can gain at most, with no serving overhead at all
        "pipelining_ceiling": (denoise + decode) / max(denoise, decode),
    }


def one_session(base: str, blocks: int, results: list, index: int) -> None:
    from websockets.sync.client import connect

    from livetalk_ray.serving.protocol import decode_block

    t0 = time.perf_counter()
    reply = httpx.post(base + "/v1/sessions", data={"portrait": "ada"}, timeout=300).json()
    arrivals, frames, batches = [], [], []
    with connect(ORIGIN.replace("http", "ws") + reply["ws"], max_size=None) as ws:
        while len(arrivals) < blocks:
            message = ws.recv(timeout=300)
            if isinstance(message, bytes):
                arrivals.append(time.perf_counter())
                header, jpegs, _ = decode_block(message)
                frames.append(len(jpegs))
                batches.append(header["timings"]["batch"])
    httpx.delete(base + f"/v1/sessions/{reply['session_id']}", timeout=60)
    results[index] = {"ttff_s": arrivals[0] - t0, "arrivals": arrivals, "frames": frames, "batches": batches}


def sessions_run(base: str, blocks: int, sessions: int) -> dict:
    """`sessions` concurrent unpaced sessions of `blocks` blocks each against one deployed app."""
    results: list = [None] * sessions
    threads = [threading.Thread(target=one_session, args=(base, blocks, results, i)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # steady state: frames after each session's first block, over the span in which all were streaming
    start = max(r["arrivals"][0] for r in results)
    end = min(r["arrivals"][-1] for r in results)
    counted = sum(sum(f for a, f in zip(r["arrivals"], r["frames"], strict=True) if start < a <= end) for r in results)
    per_session_gaps = np.concatenate([np.diff(r["arrivals"][1:]) for r in results])
    return {
        "fps": counted / max(end - start, 1e-9),
        "ttff_s": float(np.median([r["ttff_s"] for r in results])),
        "gap_p50_s": float(np.percentile(per_session_gaps, 50)),
        "gap_p99_s": float(np.percentile(per_session_gaps, 99)),
        "denoiser_mean_batch": float(np.mean([b for r in results for b in r["batches"][1:]])),
    }


def ttff_probe(base: str) -> float:
    """Median time to the first block over TTFF_PROBES fresh sessions, one after the other."""
    results: list = [None]
    ttffs = []
    for _ in range(TTFF_PROBES):
        one_session(base, 1, results, 0)
        ttffs.append(results[0]["ttff_s"])
    return float(np.median(ttffs))


def deploy(cfg, name: str) -> str:
    from ray import serve

    from livetalk_ray.cli.serve import wait_healthy
    from livetalk_ray.serving.app import build_app

    serve.run(build_app(cfg, overrides=DEPLOYMENT), name=name, route_prefix=f"/{name}", blocking=False)
    base = f"{ORIGIN}/{name}"
    wait_healthy(base, timeout_s=600)
    one_session(base, 3, [None], 0)  # warm-up: first calls load kernels and caches
    return base


def median_run(runs: list[dict]) -> dict:
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def main() -> None:
    global ORIGIN
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    parser.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from livetalk_ray.config import load_config

    torch.set_num_threads(1)  # the same per-process threads as a Serve replica
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ORIGIN = f"http://127.0.0.1:{port}"
    # Capacity, not admission: enough slots that every session streams (bench/load.py measures admission).
    slots = ["serve.admission.denoiser_slots=8", "serve.admission.decoder_slots=8"]
    unpaced = ["serve.lead_blocks=100000", *slots, *args.set]  # e.g. --set vae.decoder=tiny
    cfg = load_config("toy", overrides=unpaced)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[dict]] = {"in_process": [], "serve_1": [], "serve_sequential": [], "serve_4": []}
    try:
        # Both apps stay deployed and the measurements interleave, so machine noise hits all of them alike.
        piped = deploy(cfg, "piped")
        sequential = deploy(load_config("toy", overrides=[*unpaced, "serve.blocks_in_flight=1"]), "sequential")
        for _ in range(args.rounds):
            runs["in_process"].append(in_process(cfg, args.blocks))
            runs["serve_1"].append({**sessions_run(piped, args.blocks, 1), "ttff_s": ttff_probe(piped)})
            runs["serve_sequential"].append(sessions_run(sequential, args.blocks, 1))
            runs["serve_4"].append(sessions_run(piped, args.blocks, 4))
    finally:
        serve.shutdown()
        ray.shutdown()
    local, one, seq, four = (median_run(runs[k]) for k in ("in_process", "serve_1", "serve_sequential", "serve_4"))
    ratios = {
        "serve_fps_over_in_process": one["fps"] / local["fps"],
        "pipelined_over_sequential": one["fps"] / seq["fps"],
        "serve_ttff_over_first_block_compute": one["ttff_s"] / local["first_block_s"],
        "four_sessions_over_one": four["fps"] / one["fps"],
    }
    goals = {
        "serve_fps_over_in_process": (">=", 0.9),
        "pipelined_over_sequential": (">=", 1.4),
        "serve_ttff_over_first_block_compute": ("<=", 1.3),
        "four_sessions_over_one": (">=", 1.5),
    }
    table = Table(title=f"serving, toy preset, 2 CPU cores (medians of {args.rounds} interleaved rounds)")
    for col in ("measure", "value", "goal", "met"):
        table.add_column(col)
    table.add_row("in-process FPS", f"{local['fps']:.1f}", "", "")
    table.add_row("in-process first block s", f"{local['first_block_s']:.3f}", "", "")
    table.add_row(
        "in-process block s: denoise, decode", f"{local['denoise_block_s']:.3f}, {local['decode_block_s']:.3f}", "", ""
    )
    table.add_row("pipelining ceiling (stage balance)", f"{local['pipelining_ceiling']:.2f}", "", "")
    for name, r in (("Serve 1 session", one), ("Serve sequential", seq), ("Serve 4 sessions", four)):
        table.add_row(f"{name} FPS", f"{r['fps']:.1f}", "", "")
        table.add_row(f"{name} TTFF s", f"{r['ttff_s']:.3f}", "", "")
        table.add_row(f"{name} gap p50, p99 s", f"{r['gap_p50_s']:.3f}, {r['gap_p99_s']:.3f}", "", "")
        table.add_row(f"{name} mean denoise batch", f"{r['denoiser_mean_batch']:.2f}", "", "")
    met = {}
    for name, value in ratios.items():
        op, goal = goals[name]
        met[name] = value >= goal if op == ">=" else value <= goal
        table.add_row(name, f"{value:.2f}", f"{op} {goal}", "yes" if met[name] else "no")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"median": {"in_process": local, "serve_1": one, "serve_sequential": seq, "serve_4": four}}
    result.update(ratios=ratios, met=met, runs=runs, blocks=args.blocks, rounds=args.rounds, overrides=args.set)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
