"""Admission through Serve (serving/placement.py): sessions beyond the real-time slots wait in the queue or are
refused with Retry-After, the admitted ones keep real-time pace, a freed slot starts the queue's first; and with
two Ingress replicas, placement is one for both, so no Denoiser replica is ever given more sessions than slots.
Each test has its own app beside the shared one."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from ray import serve

from livetalk_ray.cli.serve import wait_healthy
from livetalk_ray.config import load_config
from livetalk_ray.serving.app import build_app
from livetalk_ray.serving.routing import routing_key
from tests.serving.clients import SessionClient


def tiny(**extra) -> dict:
    out = {name: {"ray_actor_options": {"num_cpus": 0.05}} for name in ("VAEDecoder", "LLM", "Speech", "ASR")}
    out["Denoiser"] = {"ray_actor_options": {"num_cpus": 0.05}}
    out["Ingress"] = {"ray_actor_options": {"num_cpus": 0.05}}
    for name, options in extra.items():
        out[name].update(options)
    return out


def puppet(seed: int) -> dict:
    return {"portrait": "bo", "seed": seed, "mode": "puppet"}


@pytest.mark.parametrize("seconds", [30, pytest.param(120, marks=pytest.mark.slow)])
def test_sessions_beyond_the_slots_queue_or_get_503_and_the_admitted_keep_real_time(server, seconds):
    cfg = load_config(
        "toy",
        overrides=[
            "model.num_layers=2",
            "vae.decoder=tiny",
            "serve.admission.denoiser_slots=2",
            "serve.admission.decoder_slots=2",
            "serve.admission.max_queue=1",
        ],
    )
    name = f"admit{seconds}"
    serve.run(build_app(cfg, overrides=tiny()), name=name, route_prefix="/" + name, blocking=False)
    base = server + "/" + name
    try:
        wait_healthy(base, timeout_s=300)
        admitted = [SessionClient(base, puppet(seed)) for seed in (1, 2)]
        for client in admitted:
            client.start()
            client.connected.wait(120)
        queued = SessionClient(base, puppet(3))
        queued.start()
        queued.connected.wait(120)
        refused = httpx.post(base + "/v1/sessions", data=puppet(4), timeout=60)

        assert [c.created.status_code for c in admitted] == [201, 201]
        assert queued.created.status_code == 202, queued.created.text
        assert queued.created.json()["queue"]["position"] == 1
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
        assert "every real-time slot is taken" in refused.json()["detail"]

        time.sleep(seconds)
        assert not queued.blocks, "a queued session streamed before it had slots"
        assert queued.events_of("queued")[0]["position"] == 1
        block_s = cfg.block_seconds
        for client in admitted:
            gaps = client.gaps(first=2)
            assert len(gaps) >= seconds / block_s * 0.8, f"{len(gaps)} blocks in {seconds} s"
            p99 = float(np.percentile(gaps, 99))
            assert p99 <= 1.2 * block_s, f"gap p99 {p99:.2f} s against a {block_s:.2f} s block"
            assert not client.events_of("reprimed") and client.error is None

        admitted[0].stop.set()  # its slot goes to the queue's first
        admitted[0].join(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not queued.blocks:
            time.sleep(0.2)
        assert queued.events_of("admitted") and queued.blocks, queued.events
        print(f"admitted gap p99 {p99:.3f} s (block {block_s:.3f} s); queue wait {queued.events_of('admitted')}")
    finally:
        serve.delete(name)


def test_two_ingress_replicas_share_one_placement_and_never_overfill_a_denoiser(server):
    cfg = load_config(
        "toy",
        overrides=[
            "model.num_layers=2",
            "vae.decoder=tiny",
            "serve.admission.denoiser_slots=2",
            "serve.admission.decoder_slots=4",
        ],
    )
    overrides = tiny(Ingress={"num_replicas": 2}, Denoiser={"num_replicas": 2})
    serve.run(build_app(cfg, overrides=overrides), name="two", route_prefix="/two", blocking=False)
    base = server + "/two"
    try:
        wait_healthy(base, timeout_s=300)
        clients = [SessionClient(base, puppet(seed), blocks=3) for seed in range(4)]
        for client in clients:  # all at once: each Ingress replica admits while the other does
            client.start()
        for client in clients:
            client.connected.wait(120)
        placement = serve.get_deployment_handle("Placement", "two")
        status = placement.status.remote().result()
        denoisers = status["replicas"]["Denoiser"]
        held = {
            replica: serve.get_deployment_handle("Denoiser", "two")
            .options(session_id=routing_key("probe", replica))
            .session_count.remote()
            .result()
            for replica in denoisers
        }
        for client in clients:
            client.join(timeout=120)
            assert client.error is None and client.created.status_code == 201, client.created.text
            assert len(client.blocks) == 3
        assert sorted(r["sessions"] for r in denoisers.values()) == [2, 2], denoisers
        assert all(count <= 2 for count in held.values()), held  # what the replicas really hold
        holders = {lease["holder"] for lease in status["leases"].values()}
        print(f"sessions per Denoiser replica {held}; admitted by {len(holders)} Ingress replicas")
    finally:
        serve.delete("two")
