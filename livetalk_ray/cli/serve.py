"""`livetalk serve`: local Ray + the avatar app on the embedded default (or a checkpoint), until Ctrl-C."""

from __future__ import annotations

import ipaddress
import secrets
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from livetalk_ray.cli.common import (
    AddressOpt,
    ConfigOpt,
    PresetOpt,
    SetOpt,
    console,
    friendly_errors,
    ray_session,
    resolve_config,
)
from livetalk_ray.config import ConfigError

APP_NAME = "livetalk"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wait_healthy(url: str, timeout_s: float, stop: threading.Event | None = None) -> None:
    """Wait until the app at `url` answers /healthz with 200 (503 while its models load); `stop` ends the wait."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    if not stop.is_set():
        raise ConfigError(f"the app did not answer {url}/healthz within {timeout_s:.0f} s (see `ray logs`)")


@friendly_errors
def serve_command(
    host: Annotated[str | None, typer.Option("--host", help="bind address (beyond loopback: token auth)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="student checkpoint directory")] = None,
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="seconds to wait for /healthz")] = 600.0,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Serve live avatar sessions: the web page, the HTTP/WebSocket API and every deployment, on local Ray."""
    from ray import serve

    from livetalk_ray.serving.app import build_app

    cfg = resolve_config(preset, config, set_)
    s = cfg.serve
    s.host, s.port = host or s.host, s.port if port is None else port
    if s.token is None and not _loopback(s.host):
        s.token = secrets.token_urlsafe(24)
        console.print(f"bound beyond loopback: API token [bold]{s.token}[/] (Authorization: Bearer …)")
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise ConfigError(f"--checkpoint {checkpoint} has no model.safetensors")
    stop = threading.Event()
    with ray_session(address):
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        try:
            serve.start(http_options={"host": s.host, "port": s.port})
            serve.run(build_app(cfg, checkpoint), name=APP_NAME, route_prefix="/", blocking=False)
            shown = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
            url = f"http://{shown}:{s.port}"
            wait_healthy(url, ready_timeout, stop)
            if not stop.is_set():
                console.print(f"[bold green]ready[/]: open {url}  ·  API docs {url}/docs  ·  Ctrl-C stops")
            stop.wait()
            console.print("shutting down …")
        finally:
            serve.shutdown()


@friendly_errors
def loadtest_command(
    url: Annotated[str, typer.Option("--url", help="server base URL")] = "http://127.0.0.1:8000",
    sessions: Annotated[int, typer.Option("--sessions", min=1, help="concurrent WebSocket sessions")] = 4,
    minutes: Annotated[float, typer.Option("--minutes", min=0.05, help="how long each session streams")] = 2.0,
    token: Annotated[str | None, typer.Option("--token", help="API token, if the server wants one")] = None,
    portrait: Annotated[str, typer.Option("--portrait", help="bundled portrait name")] = "ada",
    app: Annotated[str, typer.Option("--app", help="Serve app whose replica memory to sample")] = APP_NAME,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
) -> None:
    """Stream N concurrent sessions for M minutes against a running server and report drops, time to first
    frame, inter-block gaps and (for a server on this machine) replica memory; exits 1 if any session dropped."""
    import json

    from rich.progress import Progress
    from rich.table import Table

    from livetalk_ray.serving.loadtest import local_replica_memory, run_load

    try:
        urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"no server answers {url}/healthz ({exc}); start one with `livetalk serve`") from None
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{sessions} sessions × {minutes:g} min", total=1.0)
        report = run_load(
            url,
            sessions,
            minutes * 60,
            token=token,
            portrait=portrait,
            memory_probe=lambda: local_replica_memory(app),
            progress=lambda done: bar.update(task, completed=done),
        )

    table = Table(title=f"load test: {sessions} sessions × {minutes:g} min at {url}")
    table.add_column("measure")
    table.add_column("value")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    for error in report.errors:
        console.print(f"[red]{error}[/]")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if report.dropped:
        raise typer.Exit(1)
