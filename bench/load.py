"""Load test on loopback, in two parts, as a real client (`livetalk loadtest`'s code) against real servers.

1. Admission: `livetalk serve` (toy preset, shipped weights, paced real-time streams, the default real-time slots)
   as a real process, then N concurrent sessions for M minutes. Sessions beyond the slots wait in the queue (202)
   and stream once a slot frees up; reported: admitted / queued / refused, how many streaming sessions held real
   time (gap p99 ≤ 1.2x the block), queue wait, drops, TTFF, gaps and replica memory over the run.
2. Scale-in (`--drain-sessions`, 0 to skip): an app with 2 Denoiser replicas (tiny decoder) streams that many
   sessions; a third of the way in, autoscaling scales the Denoiser to 1 replica (the sessions fit its slots). The
   stopping replica's sessions move to the other: reported are the migrations, the longest pause a move caused,
   re-primes (none expected) and the gaps.

    .venv/bin/python bench/load.py [--sessions 4] [--minutes 2] [--drain-sessions 3] [--set vae.decoder=tiny]
                                   [--out bench/results/load.json]

The stream is paced to the video's 16 fps, so a session at real time shows a gap near 0.75 s (12 frames per block).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from livetalk_ray.cli.serve import served  # noqa: E402

DRAIN_APP = "drain"


def admission(args) -> dict:
    cli = str(Path(sys.executable).with_name("livetalk"))
    out = args.out.with_name(args.out.stem + "_admission.json")
    with served(*(x for item in args.set for x in ("--set", item))) as url:
        load = [cli, "loadtest", "--url", url, "--sessions", str(args.sessions), "--minutes", str(args.minutes)]
        code = subprocess.run([*load, "--json", str(out)]).returncode  # prints the table, writes the JSON
    report = json.loads(out.read_text())
    out.unlink()
    report["exit_code"] = code
    return report


def scale_in(args) -> dict:
    """Stream `--drain-sessions` sessions (tiny decoder: one decoder replica holds them at real time) on 2 Denoiser
    replicas whose autoscaling (SessionLoad: they fit one replica's slots) scales in a third of the way in."""
    import ray
    from ray import serve

    from livetalk_ray.cli.serve import wait_healthy
    from livetalk_ray.config import load_config
    from livetalk_ray.serving.app import build_app
    from livetalk_ray.serving.loadtest import run_load

    seconds, n = args.minutes * 60, args.drain_sessions
    env = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}  # Serve's default push: every 10 s
    denoiser = {
        "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": env}},
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 2,
            "max_replicas": 2,
            "downscale_delay_s": seconds / 3,  # from the app's start: the sessions stream by then
            "policy": {"policy_function": "livetalk_ray.serving.autoscaling:SessionLoad"},
        },
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    slots = [f"serve.admission.denoiser_slots={n}", f"serve.admission.decoder_slots={n}"]
    cfg = load_config("toy", overrides=["vae.decoder=tiny", *slots, *args.set])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Reservations are logical (a fractional-CPU replica computes on one thread): 0.1 each lets both Denoiser
        # replicas and the rest fit the 2 CPUs.
        small = {name: {"ray_actor_options": {"num_cpus": 0.1}} for name in ("VAEDecoder", "LLM", "Speech", "ASR")}
        overrides = {**small, "Ingress": small["ASR"], "Denoiser": denoiser}
        serve.run(build_app(cfg, overrides=overrides), name=DRAIN_APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=600)
        placement = serve.get_deployment_handle("Placement", DRAIN_APP)  # both Denoisers take sessions once reported
        while len(placement.status.remote().result()["replicas"]["Denoiser"]) < 2:
            time.sleep(0.2)
        started, scaled = time.monotonic(), {}

        def watch() -> None:
            while time.monotonic() - started < seconds:
                states = serve.status().applications[DRAIN_APP].deployments["Denoiser"].replica_states
                if states.get("RUNNING", 0) < 2 and "scaled_in_at_s" not in scaled:
                    scaled["scaled_in_at_s"] = round(time.monotonic() - started, 1)
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        report = run_load(url, n, seconds).to_json()
        # A driver sees a pause (`migrated`) only when its call reaches the new replica before the import: the
        # moves themselves, and what they took, are Placement's record.
        report["moves"] = placement.status.remote().result()["moves"]
        replicas = serve.status().applications[DRAIN_APP].deployments["Denoiser"].replica_states
        report.update(scaled, denoiser_replicas_after=replicas, block_s=cfg.block_seconds)
        return report
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--drain-sessions", type=int, default=3, help="sessions during the scale-in (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load.json")
    parser.add_argument("--set", action="append", default=[], help="config override for the server (repeatable)")
    args = parser.parse_args()
    result = {"admission": admission(args)}
    if args.drain_sessions:
        result["scale_in"] = scale_in(args)
        s = result["scale_in"]
        print(
            f"scale-in: {len(s['moves'])} sessions moved ({[m['seconds'] for m in s['moves']]} s each); "
            f"{s['migrations']} drivers saw a pause, the longest {s['migration_pause_max_s']} s, "
            f"gap p99 {s['gap_p99_s']:.3f} s (block {s['block_s']:.2f} s), dropped {s['dropped']}, errors {s['errors']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(result["admission"]["exit_code"])


if __name__ == "__main__":
    main()
