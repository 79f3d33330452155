"""`livetalk monitor` as a real process against the test cluster: Prometheus comes up scraping the node's
metrics port, and SIGTERM stops both; the cluster config in cluster/prometheus/ is the same scrape setup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from livetalk_ray.cli.monitor import prometheus_config
from tests.test_metrics_end_to_end import free_port

ROOT = Path(__file__).parents[2]
LIVETALK = str(Path(sys.executable).with_name("livetalk"))


def test_the_cluster_config_is_the_monitor_config_on_rays_discovery_file():
    cluster = yaml.safe_load((ROOT / "cluster" / "prometheus" / "prometheus.yml").read_text())
    ray_file = Path("/tmp/ray/prom_metrics_service_discovery.json")
    assert cluster == prometheus_config(ray_file, scrape_interval_s=5.0)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")
def test_monitor_scrapes_the_running_cluster_and_stops_on_sigterm(ray_cluster, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [LIVETALK, "monitor", "--port", str(port), "--data-dir", str(tmp_path), "--scrape-interval", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, targets = time.monotonic() + 60, []
        while time.monotonic() < deadline and not any(t["health"] == "up" for t in targets):
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as reply:
                    targets = json.loads(reply.read())["data"]["activeTargets"]
            except OSError:
                pass
        assert any(t["health"] == "up" and t["labels"]["job"] == "ray" for t in targets), targets
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert "scraping 1 node(s)" in out and "stopping prometheus" in out
        with pytest.raises(OSError):  # Prometheus went with it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_missing_prometheus_is_one_clear_line(ray_cluster, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # the venv's tools only: no prometheus
    result = subprocess.run(
        [LIVETALK, "monitor", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "apt-get install prometheus" in result.stderr + result.stdout
