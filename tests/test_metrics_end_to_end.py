"""Every `livetalk_*` metric family reaches a real Prometheus, and every panel of the Grafana dashboard draws
data: Prometheus (started as `livetalk monitor` starts it) scrapes the test cluster while data curation,
a teacher run, a DMD run and live sessions run — one chats (LLM and speech), then both lose their Denoiser
replica twice, so they are re-primed once and then end with an error."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from livetalk_ray import metrics
from livetalk_ray.cli import app
from livetalk_ray.cli.monitor import query_range, ray_metrics_targets, start_prometheus, wait_ready
from livetalk_ray.cli.serve import wait_healthy
from livetalk_ray.config import load_config
from livetalk_ray.data.pipeline import prepare
from livetalk_ray.data.synthetic import write_random_shards
from livetalk_ray.models.checkpoint import save_checkpoint
from livetalk_ray.models.dit import WanDiT
from livetalk_ray.toyworld.clips import make_demo_dataset
from tests.train.conftest import train_cfg
from tests.train.dmd.conftest import dmd_cfg

DASHBOARD = Path(__file__).parents[1] / "cluster" / "grafana" / "livetalk.json"
TINY = ["model.dim=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=64"]

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curate_data(root: Path) -> None:
    make_demo_dataset(root / "clips", 4, seed=5, corrupt_fraction=0.5)
    prepare(load_config("toy"), root / "clips", root / "shards", progress=False)


def train_teacher_and_dmd(root: Path) -> None:
    shards = write_random_shards(train_cfg(), root / "random_shards")
    sets = [x for item in [*TINY, "train.engine.micro_batch_per_worker=2"] for x in ("--set", item)]
    args = ["train", "teacher", "--data", str(shards), "--out", str(root / "teacher"), "--max-steps", "3"]
    result = CliRunner().invoke(app, [*args, "--workers", "1", *sets])
    assert result.exit_code == 0, result.output

    from livetalk_ray.train.dmd.controller import Controller

    checkpoints = []
    for name, seed in (("teacher", 5), ("student", 6)):
        torch.manual_seed(seed)
        model = WanDiT(train_cfg().model)
        nn.init.normal_(model.head.head.weight, std=0.02)
        checkpoints.append(str(save_checkpoint(model, train_cfg(), root / "dmd_ckpt" / name)))
    Controller(dmd_cfg(*checkpoints, "train.dmd.staleness=1"), shards, root / "dmd", 6).run()


def serve_sessions_losing_the_denoiser(port: int) -> None:
    import ray
    from ray import serve
    from websockets.sync.client import connect

    from livetalk_ray.serving.app import build_app

    cfg = load_config("toy", overrides=["model.num_layers=2", "serve.max_reprimes=1", "serve.open_timeout_s=3"])
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    overrides = {n: small for n in ("Denoiser", "VAEDecoder", "LLM", "Speech", "ASR", "Ingress")}
    serve.run(build_app(cfg, overrides=overrides), name="metrics", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout_s=300)
        events: list[str] = []

        def session(chat: bool) -> None:
            reply = httpx.post(base + "/v1/sessions", data={"portrait": "ada"}, timeout=120).json()
            with connect(base.replace("http", "ws") + reply["ws"]) as ws:
                if chat:  # the LLM and Speech deployments' metrics
                    ws.send(json.dumps({"type": "chat", "text": "Hello, who are you?"}))
                while True:
                    message = ws.recv(timeout=120)
                    if isinstance(message, str):
                        events.append(message)
                        if '"closed"' in message:
                            return

        threads = [threading.Thread(target=session, args=(chat,), daemon=True) for chat in (True, False)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120  # the reply is spoken before the Denoiser is lost
        while time.monotonic() < deadline and not any('"speech"' in e for e in events):
            time.sleep(1)
        # One kill: each session is re-primed once (a re-prime), and its re-open, which cannot find a replica
        # within serve.open_timeout_s (the replacement loads for longer), is the second loss in a row: the end.
        time.sleep(8)
        denoiser = next(
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "Denoiser" in a["name"] and a["name"].startswith("SERVE_REPLICA")
        )
        ray.kill(ray.get_actor(denoiser["name"], namespace=denoiser["namespace"]), no_restart=True)
        for t in threads:
            t.join(timeout=180)
        assert sum('"code":"session_lost"' in e for e in events) == 2, events
    finally:
        serve.delete("metrics")


def serve_a_queue_and_a_drain(port: int) -> None:
    """Admission and migration metrics: 2 Denoiser replicas of 1 slot each and 3 sessions (the third queued);
    autoscaling (told 4 sessions fit a replica) scales the Denoiser in, which moves the stopping replica's session;
    ending the first two sessions admits the third."""
    from ray import serve

    from livetalk_ray.serving.app import build_app
    from tests.serving.clients import scaling_denoiser, wait_for_placement

    overrides = ["model.num_layers=2", "serve.admission.denoiser_slots=1", "serve.admission.decoder_slots=4"]
    cfg = load_config("toy", overrides=overrides)
    small = {"ray_actor_options": {"num_cpus": 0.05}}
    deployments = {n: small for n in ("VAEDecoder", "LLM", "Speech", "ASR", "Ingress")}
    deployments["Denoiser"] = scaling_denoiser(downscale_delay_s=30, sessions_per_replica=4)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, overrides=deployments), name="admission", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout_s=300)
        wait_for_placement("admission", denoisers=2)
        form = {"portrait": "bo", "mode": "puppet"}
        created = [httpx.post(base + "/v1/sessions", data=form, timeout=120) for _ in range(3)]
        assert [r.status_code for r in created] == [201, 201, 202], [r.text for r in created]
        deadline = time.monotonic() + 120  # the scale-in, and its move
        while time.monotonic() < deadline and denoiser_count("admission") != 1:
            time.sleep(1)
        time.sleep(5)
        for reply in created[:2]:
            httpx.delete(base + f"/v1/sessions/{reply.json()['session_id']}", timeout=60)
        queued = created[2].json()["session_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and httpx.get(base + f"/v1/sessions/{queued}").json()["state"] == "queued":
            time.sleep(0.5)
        assert httpx.get(base + f"/v1/sessions/{queued}").json()["state"] != "queued"
    finally:
        serve.delete("admission")


def denoiser_count(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["Denoiser"].replica_states.get("RUNNING", 0)


def test_every_metric_family_and_every_dashboard_panel_has_data(ray_cluster, tmp_path):
    port, start = free_port(), time.time()
    prometheus = start_prometheus(tmp_path / "prometheus", port, ray_metrics_targets(), scrape_interval_s=1.0)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, prometheus)
        curate_data(tmp_path)
        train_teacher_and_dmd(tmp_path)
        serve_port = free_port()  # one HTTP port for both apps (Serve's proxy is started once)
        serve_a_queue_and_a_drain(serve_port)
        serve_sessions_losing_the_denoiser(serve_port)

        families = {metrics.exported_name(spec): spec for spec in metrics.ALL_METRICS}
        deadline, missing = time.monotonic() + 60, list(families)
        while missing and time.monotonic() < deadline:  # Ray reports every 2 s here; scrapes every 1 s
            time.sleep(3)
            selector = {n: f"{n}_count" if families[n].kind == "histogram" else n for n in missing}
            missing = [n for n in missing if not query_range(url, selector[n], start, time.time())]
        assert not missing, f"no data for {missing}"

        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m")
                if not query_range(url, expr, start, time.time()):
                    empty.append(f"{panel['title']}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert len([p for p in dashboard["panels"] if p["type"] != "row"]) >= 15
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
