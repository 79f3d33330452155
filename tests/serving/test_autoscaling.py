"""Autoscaling on session load: a Denoiser with min 1 / max 2 replicas, 2 real-time slots each, and the SessionLoad
policy scales up when a third session waits in the admission queue (the queue is demand), admits it on the new
replica, and scales back down when they end. Its own app (route prefix /scale) beside the shared one."""

from __future__ import annotations

import threading
import time

import httpx
from ray import serve
from websockets.sync.client import connect

from livetalk_ray.cli.serve import wait_healthy
from livetalk_ray.config import load_config
from livetalk_ray.serving.app import build_app


def denoiser_replicas() -> int:
    status = serve.status().applications["scale"].deployments["Denoiser"]
    return status.replica_states.get("RUNNING", 0)


def test_the_denoiser_scales_up_under_session_load_and_back_down(server):
    # Paced sessions within what one tiny-decoder replica streams at real time: SessionLoad scales on sessions held
    # and queued, not on compute, so the streams need not be unpaced to drive it.
    slots = ["serve.admission.denoiser_slots=2", "serve.admission.decoder_slots=4"]
    cfg = load_config("toy", overrides=["model.num_layers=2", "vae.decoder=tiny", *slots])
    tiny = {"ray_actor_options": {"num_cpus": 0.1}}
    overrides = {name: tiny for name in ("VAEDecoder", "LLM", "Speech", "ASR", "Ingress")}
    overrides["Denoiser"] = {
        # replicas report their sessions every second (Serve's default push interval is 10 s)
        "ray_actor_options": {
            "num_cpus": 0.1,
            "runtime_env": {"env_vars": {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}},
        },
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 8,
            "look_back_period_s": 4,
            "policy": {
                "policy_function": "livetalk_ray.serving.autoscaling:SessionLoad",
            },
        },
    }
    serve.run(build_app(cfg, overrides=overrides), name="scale", route_prefix="/scale", blocking=False)
    base = server + "/scale"
    try:
        wait_healthy(base, timeout_s=300)
        assert denoiser_replicas() == 1
        stop = threading.Event()

        failures: list[BaseException] = []
        reprimed: list[str] = []
        admitted: list[str] = []  # sessions that waited in the queue, then got their slots

        def session() -> None:
            try:
                reply = httpx.post(base + "/v1/sessions", data={"portrait": "bo"}, timeout=120).json()
                with connect(server.replace("http", "ws") + reply["ws"]) as ws:
                    while not stop.is_set():
                        message = ws.recv(timeout=60)  # read everything: the driver never waits for us
                        if isinstance(message, str) and '"reprimed"' in message:
                            reprimed.append(message)
                        if isinstance(message, str) and '"admitted"' in message:
                            admitted.append(message)
                httpx.delete(base + f"/v1/sessions/{reply['session_id']}")
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                failures.append(exc)

        threads = [threading.Thread(target=session, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        deadline, peak = time.monotonic() + 180, 1
        while time.monotonic() < deadline and (peak < 2 or not admitted):
            peak = max(peak, denoiser_replicas())
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures
        assert peak == 2, "no scale-up under load"
        assert admitted, "the queued session was never admitted on the new replica"
        assert not reprimed, reprimed  # sessions stay pinned: scaling up moves none of them
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and denoiser_replicas() != 1:
            time.sleep(1)
        assert denoiser_replicas() == 1, "no scale-down after the sessions ended"
    finally:
        serve.delete("scale")
