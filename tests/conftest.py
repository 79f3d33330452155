"""Shared fixtures: tiny configs and the real portrait/speech fixtures from ../shared (skipped if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from livetalk_ray.config import LiveTalkConfig, load_config

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the same in every process of the test cluster
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # metrics reach Prometheus within seconds
# Serve's HTTP proxy ends a session's WebSocket properly when its Ingress replica dies (serving/proxy.py).
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "livetalk_ray.serving.proxy.proxy_middlewares")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every test that needs Ray (started on first use, stopped at the end)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def toy_cfg() -> LiveTalkConfig:
    return load_config("toy")


@pytest.fixture
def tiny_cfg() -> LiveTalkConfig:
    """Smaller than toy: for tests that run thousands of forward passes."""
    return load_config("toy", overrides=["model.dim=32", "model.num_heads=2", "model.num_layers=4", "model.ffn_dim=64"])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"shared fixture {path} is not present")
    return path


@pytest.fixture(scope="session")
def portrait() -> Path:
    return fixture_path("portrait.jpg")


@pytest.fixture(scope="session")
def speech() -> Path:
    return fixture_path("speech_16k.wav")
