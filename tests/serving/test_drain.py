"""Scale-in without a reset: a Denoiser scaled from 2 replicas to 1 under 3 live sessions moves the stopping
replica's sessions to the other (serving/sessions.py's drain, serving/placement.py's targets). No session is
re-primed, every block equals the block an unmigrated run makes (same seeds), and no gap exceeds two block times.
The scale-in is Serve's own: autoscaling (SessionLoad) wants one replica for 3 sessions of 3 slots.
Its own app (route prefix /drain) beside the shared one."""

from __future__ import annotations

import time

from ray import serve

from livetalk_ray.cli.serve import wait_healthy
from livetalk_ray.config import load_config
from livetalk_ray.serving.app import build_app
from tests.serving.clients import SessionClient, scaling_denoiser, wait_for_placement

APP, BLOCKS, SEEDS = "drain", 60, (11, 12, 13)
SCALE_IN_AFTER_S = 30  # Serve scales the Denoiser in once it has wanted 1 replica this long


def overrides() -> dict:
    tiny = {"ray_actor_options": {"num_cpus": 0.05}}
    out = {name: dict(tiny) for name in ("VAEDecoder", "LLM", "Speech", "ASR", "Ingress")}
    # Start at 2 replicas; 3 sessions fit one replica's 3 slots, so autoscaling scales in while they stream.
    out["Denoiser"] = scaling_denoiser(SCALE_IN_AFTER_S)
    return out


def running(deployment: str) -> dict:
    return serve.status().applications[APP].deployments[deployment].replica_states


def stream_three(base: str, until=None) -> list[SessionClient]:
    clients = [SessionClient(base, {"portrait": "bo", "seed": seed, "mode": "puppet"}, blocks=BLOCKS) for seed in SEEDS]
    for client in clients:
        client.start()
    if until is not None:
        until(clients)
    for client in clients:
        client.join(timeout=180)
    for client in clients:
        assert client.error is None, client.error
        assert client.created.status_code == 201, client.created.text
    return clients


def test_scaling_in_moves_sessions_bit_exactly_without_a_reprime(server):
    cfg = load_config(
        "toy",
        overrides=[
            "model.num_layers=2",
            "vae.decoder=tiny",  # 3 sessions on one decoder replica at real time (2 cores)
            "serve.batch_sessions=1",  # one session per computation: the same numbers in both runs
            "serve.admission.denoiser_slots=3",
            "serve.admission.decoder_slots=4",
        ],
    )
    serve.run(build_app(cfg, overrides=overrides()), name=APP, route_prefix="/" + APP, blocking=False)
    base = server + "/" + APP
    try:
        wait_healthy(base, timeout_s=300)
        assert running("Denoiser").get("RUNNING") == 2
        wait_for_placement(APP, denoisers=2)  # /healthz needs one replica of each stage; this test needs both
        seen = []

        def watch_scale_in(clients: list[SessionClient]) -> None:
            while any(c.is_alive() for c in clients):
                seen.append((min(len(c.blocks) for c in clients), dict(running("Denoiser"))))
                time.sleep(0.5)

        moved = stream_three(base, watch_scale_in)
        assert running("Denoiser") == {"RUNNING": 1}, seen
        blocks_when_scaled = [blocks for blocks, states in seen if states.get("RUNNING", 0) < 2]
        assert blocks_when_scaled and 2 < blocks_when_scaled[0] < BLOCKS - 4, seen  # mid-stream
        moves = serve.get_deployment_handle("Placement", APP).status.remote().result()["moves"]
        reference = stream_three(base)  # the same sessions, never moved

        # A driver sees a `migrated` pause only when its next call reaches the new replica before the import.
        migrations = [e for c in moved for e in c.events_of("migrated")]
        assert moves and all(m["moved"] for m in moves), ("the stopping replica moved no session", moves)
        assert not [e for c in moved for e in c.events_of("reprimed")]
        block_s = cfg.block_seconds
        for m, r in zip(moved, reference, strict=True):
            assert sorted(m.blocks) == list(range(BLOCKS))
            for index in range(BLOCKS):
                assert m.blocks[index] == r.blocks[index], f"seed {m.form['seed']}: block {index} differs"
            worst = max(m.gaps(first=2))
            assert worst <= 2 * block_s, f"a {worst:.2f} s gap (block time {block_s:.2f} s) around the move"
        print(f"moves {moves}; pauses drivers saw {[e['pause_s'] for e in migrations]}; block {block_s:.2f} s")
    finally:
        serve.delete(APP)
