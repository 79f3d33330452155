"""`livetalk monitor`: a local Prometheus scraping every node of a running Ray cluster.

Ray exports each node's metrics (ours included, as `ray_livetalk_*`) on the node's metrics port. On a
real cluster Prometheus reads the head's service-discovery file (cluster/prometheus/prometheus.yml); here
the command writes its own target file from `ray.nodes()` and refreshes it while it runs, so it also works
when the Ray dashboard (which writes that file) is off. Grafana: import cluster/grafana/livetalk.json.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated

import typer
import yaml

from livetalk_ray.cli.common import AddressOpt, console, friendly_errors, ray_session
from livetalk_ray.config import ConfigError

JOB = "ray"  # the job label Ray's own service-discovery file uses, so dashboards work on both
DEFAULT_DATA_DIR = Path.home() / ".cache" / "livetalk" / "prometheus"


def prometheus_config(targets_file: Path, scrape_interval_s: float) -> dict:
    """The scrape configuration (cluster/prometheus/prometheus.yml is the same with Ray's own target file)."""
    interval = f"{scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": JOB, "file_sd_configs": [{"files": [str(targets_file)]}]}],
    }


def ray_metrics_targets() -> list[str]:
    """host:port of the metrics exporter of every live node of the connected cluster."""
    import ray

    return sorted(
        f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    )


def write_targets(path: Path, targets: list[str]) -> None:
    tmp = path.with_suffix(".tmp")  # Prometheus watches the file: replace it whole, never half-written
    tmp.write_text(json.dumps([{"labels": {"job": JOB}, "targets": targets}]))
    tmp.replace(path)


def start_prometheus(data_dir: Path, port: int, targets: list[str], scrape_interval_s: float) -> subprocess.Popen:
    """Start Debian's `prometheus` on 127.0.0.1:`port` with its config and storage under `data_dir`."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ConfigError("`prometheus` is not installed (Debian/Ubuntu: apt-get install prometheus)")
    data_dir.mkdir(parents=True, exist_ok=True)
    targets_file = data_dir / "targets.json"
    write_targets(targets_file, targets)
    config = data_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets_file, scrape_interval_s), sort_keys=False))
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (data_dir / "prometheus.log").open("ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"prometheus exited with code {process.returncode} (see its prometheus.log)")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise ConfigError(f"prometheus did not become ready at {url} within {timeout_s:.0f} s")


def query_range(url: str, expr: str, start: float, end: float, step_s: float = 2.0) -> list[dict]:
    """The series a PromQL expression returns over [start, end] (what a dashboard panel would draw)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as reply:
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise ValueError(f"query {expr!r} failed: {body.get('error')}")
    return body["data"]["result"]


@friendly_errors
def monitor_command(
    port: Annotated[int, typer.Option("--port", help="Prometheus web port")] = 9090,
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Prometheus config and storage")] = DEFAULT_DATA_DIR,
    scrape_interval: Annotated[float, typer.Option("--scrape-interval", min=1.0, help="seconds")] = 5.0,
    address: AddressOpt = "auto",
) -> None:
    """Start a local Prometheus that scrapes every node of the running Ray cluster, until Ctrl-C."""
    stop = threading.Event()
    with ray_session(address):
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        targets = ray_metrics_targets()
        if not targets:
            raise ConfigError("the cluster reports no node with a metrics port")
        process = start_prometheus(data_dir, port, targets, scrape_interval)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            console.print(f"[bold green]prometheus[/] at {url}, scraping {len(targets)} node(s): {', '.join(targets)}")
            console.print("Grafana: import cluster/grafana/livetalk.json (datasource: this Prometheus).  Ctrl-C stops")
            while not stop.wait(15.0):  # nodes join and leave: keep the target list current
                if process.poll() is not None:
                    raise ConfigError(
                        f"prometheus exited with code {process.returncode} (see {data_dir}/prometheus.log)"
                    )
                if (now := ray_metrics_targets()) != targets:
                    targets = now
                    write_targets(data_dir / "targets.json", targets)
            console.print("stopping prometheus …")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
