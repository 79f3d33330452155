"""Admission through Serve (serving/placement.py): sessions beyond the real-time slots wait in the queue or are
refused with Retry-After, the admitted ones keep real-time pace, a freed slot starts the queue's first; and with
two Ingress replicas, placement is one for both, so no Denoiser replica is ever given more sessions than slots.
Each test has its own app beside the shared one."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve

from livetalk_ray.cli.serve import wait_healthy
from livetalk_ray.config import load_config
from livetalk_ray.serving.app import build_app
from livetalk_ray.serving.routing import routing_key
from tests.serving.clients import SessionClient, wait_for_placement


def tiny(**extra) -> dict:
    out = {name: {"ray_actor_options": {"num_cpus": 0.05}} for name in ("VAEDecoder", "LLM", "Speech", "ASR")}
    out["Denoiser"] = {"ray_actor_options": {"num_cpus": 0.05}}
    out["Ingress"] = {"ray_actor_options": {"num_cpus": 0.05}}
    for name, options in extra.items():
        out[name].update(options)
    return out


def two_denoiser_slots(decoder_slots: int, extra: list[str] = ()):
    """The toy (2 layers, tiny decoder) with 2 slots per Denoiser replica."""
    slots = ["serve.admission.denoiser_slots=2", f"serve.admission.decoder_slots={decoder_slots}"]
    return load_config("toy", overrides=["model.num_layers=2", "vae.decoder=tiny", *slots, *extra])


def puppet(seed: int) -> dict:
    return {"portrait": "bo", "seed": seed, "mode": "puppet"}


@pytest.mark.parametrize("seconds", [30, pytest.param(120, marks=pytest.mark.slow)])
def test_sessions_beyond_the_slots_queue_or_get_503_and_the_admitted_keep_real_time(server, seconds):
    cfg = two_denoiser_slots(decoder_slots=2, extra=["serve.admission.max_queue=1"])
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
    cfg = two_denoiser_slots(decoder_slots=4)
    overrides = tiny(Ingress={"num_replicas": 2}, Denoiser={"num_replicas": 2})
    serve.run(build_app(cfg, overrides=overrides), name="two", route_prefix="/two", blocking=False)
    base = server + "/two"
    try:
        wait_healthy(base, timeout_s=300)
        wait_for_placement("two", denoisers=2)
        # All at once, so each Ingress replica admits while the other does. A session lives in the Ingress that
        # created it, and Serve's proxy sends a later request (a WebSocket) to either: this test reads Placement
        # and the Denoiser replicas instead of the streams.
        replies: list[httpx.Response] = []
        posts = [
            threading.Thread(
                target=lambda s=seed: replies.append(httpx.post(base + "/v1/sessions", data=puppet(s), timeout=120))
            )
            for seed in range(4)
        ]
        for thread in posts:
            thread.start()
        for thread in posts:
            thread.join(timeout=150)
        assert sorted(r.status_code for r in replies) == [201] * 4, [r.text for r in replies]
        status = serve.get_deployment_handle("Placement", "two").status.remote().result()
        denoisers = status["replicas"]["Denoiser"]
        assert sorted(r["sessions"] for r in denoisers.values()) == [2, 2], denoisers
        holders = {lease["holder"] for lease in status["leases"].values()}
        assert len(holders) == 2, f"one Ingress replica admitted all four: {holders}"

        def held() -> dict[str, int]:  # what the replicas really hold, asked of each
            handle = serve.get_deployment_handle("Denoiser", "two")
            return {
                r: handle.options(session_id=routing_key("probe", r)).session_count.remote().result() for r in denoisers
            }

        deadline, counts = time.monotonic() + 60, held()
        while sum(counts.values()) < 4 and time.monotonic() < deadline:  # opened by each session's first call
            time.sleep(0.5)
            counts = held()
        assert sorted(counts.values()) == [2, 2], counts
        print(f"sessions per Denoiser replica {counts}; admitted by {len(holders)} Ingress replicas")
    finally:
        serve.delete("two")
