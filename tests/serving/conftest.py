"""One real Serve app for the serving tests (package scope: starting it loads every model once, and it is
shut down before the Ray tests of other packages need the CPUs it reserves)."""

from __future__ import annotations

import socket

import pytest

from livetalk_ray.config import load_config

TOKEN = "test-token-123"
SMALL = {
    name: {"ray_actor_options": {"num_cpus": 0.2}}
    for name in ("Denoiser", "VAEDecoder", "LLM", "Speech", "ASR", "Ingress")
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def server(ray_cluster):
    from ray import serve

    from livetalk_ray.cli.serve import wait_healthy
    from livetalk_ray.serving.app import build_app

    port = free_port()
    cfg = load_config(
        "toy",
        overrides=[
            "model.num_layers=2",
            f"serve.token={TOKEN}",
            "serve.max_image_bytes=200000",
            "serve.messages_per_s=5",
            "serve.llm.max_new_tokens=24",
            "serve.llm.temperature=0",
            # Many tests share this app, some with several sessions at once: admission is tested in its own apps.
            "serve.admission.denoiser_slots=16",
            "serve.admission.decoder_slots=16",
        ],
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, overrides=SMALL), name="livetalk", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=300)
    yield url
    serve.shutdown()
