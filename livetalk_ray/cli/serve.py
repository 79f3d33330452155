"""`livetalk serve`: local Ray + the avatar app on the embedded default (or a checkpoint), until Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
    err_console,
    friendly_errors,
    ray_session,
    resolve_config,
)
from livetalk_ray.cli.errors import debug_enabled
from livetalk_ray.config import ConfigError, LiveTalkConfig

APP_NAME = "livetalk"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def healthz(url: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) of `url`/healthz; (0, {}) while nothing answers."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wait_healthy(
    url: str, timeout_s: float, stop: threading.Event | None = None, on_wait=None, check_failed=None
) -> None:
    """Wait until the app at `url` answers /healthz with 200 (503 while its models load); `stop` ends the wait.

    `on_wait(stages)` hears which stages are still starting; `check_failed()` may raise to end the wait early
    (a stage that cannot start)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if check_failed is not None:
            check_failed()
        code, body = healthz(url)
        if code == 200:
            return
        if on_wait is not None:
            on_wait(body.get("waiting_for") or ["HTTP proxy"])
        time.sleep(0.5)
    if not stop.is_set():
        raise ConfigError(f"the app did not answer {url}/healthz within {timeout_s:.0f} s (see `ray logs`)")


@contextlib.contextmanager
def served(*args: str, timeout_s: float = 600.0):
    """`livetalk serve ARGS` as a child process on a free loopback port, healthy, until the block ends (then
    SIGTERM); yields its base URL. For benchmarks that measure a server the way users run it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cli = str(Path(sys.executable).with_name("livetalk"))
    server = subprocess.Popen([cli, "serve", "--port", str(port), *args], stdout=sys.stderr, stderr=sys.stderr)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use: stop what serves there, or pick another with --port {port + 1}"
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host") from None


def _write_token(token: str) -> Path:
    """The generated token goes to a file only this user can read, never whole to the terminal (or its logs)."""
    path = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".livetalk") / "serve-token"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
    return path


def _preflight(cfg: LiveTalkConfig, local: bool) -> None:
    """What can be checked on this machine before Ray starts: a second instead of a failed deploy. On a remote
    cluster files live on its nodes, so only the replicas can check them (and `failed_stage` reports them)."""
    _check_port_free(cfg.serve.host, cfg.serve.port)
    if not local:
        return
    for key, value in (
        ("vae.path", cfg.vae.path),
        ("audio.path", cfg.audio.path),
        ("text.path", cfg.text.path),
        ("serve.llm.path", cfg.serve.llm.path if cfg.serve.llm.backend == "transformers" else None),
    ):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{key} {value} does not exist: fix it with --set {key}=PATH (or leave it unset)")
    from livetalk_ray.serving.llm import OpenAIBackend
    from livetalk_ray.serving.speech import Speech, SpeechError

    if cfg.serve.llm.backend == "openai":
        OpenAIBackend(cfg.serve.llm)  # the replica's own check of its settings (no request is sent)

    try:
        Speech(cfg.serve.speech, cfg.audio.sample_rate)
    except SpeechError as exc:
        raise ConfigError(str(exc)) from None


def _stage_failure_check(app_name: str):
    from livetalk_ray.serving.startup import failed_stage

    def check() -> None:
        failure = failed_stage(app_name)
        if failure is None:
            return
        if not failure.user_error or debug_enabled():
            err_console.print(failure.detail, highlight=False, markup=False)
        if not failure.user_error:
            err_console.print(f"[bold red]error:[/] {failure.line()}", highlight=False)
            raise typer.Exit(1)
        raise ConfigError(failure.line())

    return check


def _end_sessions(serve, app_name: str, within_s: float = 8.0) -> None:
    """Tell the Ingress replicas to end their sessions (viewers get `closed` and close code 1001, not a dropped
    connection), instead of Serve's drain, which waits for every WebSocket to end by itself. A handle reaches one
    replica per call, so calls go on until replicas keep answering that they had none left."""
    handle = serve.get_deployment_handle("Ingress", app_name)
    deadline, quiet = time.monotonic() + within_s, 0
    while quiet < 3 and time.monotonic() < deadline:
        try:
            left_s = max(deadline - time.monotonic(), 0.1)
            ended = handle.end_sessions.remote("server_shutdown").result(timeout_s=left_s)
        except Exception:  # noqa: BLE001 - an Ingress that cannot answer has nobody left to tell
            return
        quiet = quiet + 1 if ended == 0 else 0


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
    cfg = resolve_config(preset, config, set_)
    s = cfg.serve
    s.host, s.port = host or s.host, s.port if port is None else port
    if checkpoint is not None and not (checkpoint / "model.safetensors").is_file():
        raise ConfigError(f"--checkpoint {checkpoint} has no model.safetensors (a `livetalk export` directory)")
    local = address is None and not os.environ.get("RAY_ADDRESS")
    _preflight(cfg, local)  # before the imports below, which take seconds
    import logging

    from ray import serve

    from livetalk_ray.serving.app import build_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up INFO lines are not for users
    if s.token is None and not _loopback(s.host):
        s.token = secrets.token_urlsafe(24)
        where = _write_token(s.token)
        console.print(f"bound beyond loopback: API token {s.token[:4]}… in {where} (Authorization: Bearer TOKEN)")
    stop = threading.Event()
    with ray_session(address):
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        try:
            serve.start(http_options={"host": s.host, "port": s.port})
            # Not waiting inside Serve: its wait ends only once every deployment runs or has failed all its
            # retries (minutes, then a long traceback); here a stage that cannot start ends the wait at once.
            target = serve.RunTarget(build_app(cfg, checkpoint), name=APP_NAME, route_prefix="/")
            serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
            shown = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
            url = f"http://{shown}:{s.port}"
            with console.status("starting …") as status:
                wait_healthy(
                    url,
                    ready_timeout,
                    stop,
                    on_wait=lambda stages: status.update(f"starting: waiting for {', '.join(stages)}"),
                    check_failed=_stage_failure_check(APP_NAME),
                )
            if not stop.is_set():
                console.print(f"[bold green]ready[/]: open {url}  ·  API docs {url}/docs  ·  Ctrl-C stops")
            stop.wait()
            console.print("shutting down …")
            _end_sessions(serve, APP_NAME)
            if not local:  # the cluster stays up for its other apps; locally, Ray ends with this command
                serve.delete(APP_NAME)
        except BaseException:
            # Nothing to drain after a failed start: the local Ray ends with this command (ray_session), and a
            # remote cluster loses only this app. serve.shutdown() would wait out the stateful replicas' drain.
            if not local:
                serve.delete(APP_NAME, _blocking=False)
            raise


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
