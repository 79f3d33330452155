"""`livetalk job ...`: run a stage (`jobs/<stage>.py`) as a Ray job on a cluster, and watch, list or stop it.

`submit` ships the project directory (the one holding `jobs/`) as the job's runtime_env `working_dir`; Ray puts
it first on the job's PYTHONPATH, so the cluster runs this checkout's `livetalk_ray`. The cluster's Python must
already have the dependencies: an image with `pip install livetalk-ray` (or `pip install -e .` of this
checkout) on every node, or per-job requirements with `--pip`. `--config FILE` travels with the job from
anywhere: it is copied into `_livetalk_job/` of the uploaded directory and the entrypoint names it relative to
the working dir. Paths in the stage's own options (`--data`, `--out`, ...) are paths on the cluster.

Exit codes: 0 done (for `status`: SUCCEEDED, RUNNING or PENDING); 1 the job FAILED or was STOPPED (`submit
--wait`, `logs --follow`, `status`), or `stop` could not end it; 2 user error (unknown stage or job id,
unreachable or wrong address, bad config or override); 130 interrupted while following (the job keeps running).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from livetalk_ray.cli.common import ConfigOpt, PresetOpt, SetOpt, console, err_console, friendly_errors
from livetalk_ray.config import ConfigError, load_config

job_app = typer.Typer(no_args_is_help=True, help="Stages as Ray jobs on a cluster: submit, status, logs, stop, list.")

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
JOB_INPUTS_DIR = "_livetalk_job"  # where --config lands inside the uploaded working dir
# Top-level entries of the project that never travel: environments, VCS, run outputs, caches.
TOP_LEVEL_EXCLUDES = (".venv", ".git", "out", "runs", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache")
# Patterns Ray applies while packing (gitwildmatch, like .gitignore; the project's .gitignore/.rayignore also apply).
PACKING_EXCLUDES = ["__pycache__/", "*.pyc", "*.mp4", "bench/results/", ".pytest_cache/", ".ruff_cache/"]
PROBE_TIMEOUT_S = 5.0  # the address check; Ray's own client has no timeout and would hang on a black hole
LOG_TAIL_LINES = 20
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
HEALTHY = ("SUCCEEDED", "RUNNING", "PENDING")
STATUS_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan", "PENDING": "blue"}

ADDRESS_HELP = f"the head's dashboard URL; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS}"
JobAddressOpt = Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP)]
JobIdArg = Annotated[str, typer.Argument(help="submission id (`livetalk job list` shows them)")]


def project_root() -> Path:
    """The directory holding jobs/: this package's checkout, else the current directory or one above it."""
    import livetalk_ray

    cwd = Path.cwd().resolve()
    for candidate in (Path(livetalk_ray.__file__).resolve().parents[1], cwd, *cwd.parents):
        if (candidate / "jobs").is_dir() and (candidate / "livetalk_ray").is_dir():
            return candidate
    raise ConfigError("no project directory (with jobs/ and livetalk_ray/) found; run from a livetalk-ray checkout")


def job_stages(root: Path) -> list[str]:
    """Every stage with an entrypoint, i.e. every jobs/<stage>.py."""
    return sorted(p.stem for p in (root / "jobs").glob("*.py") if not p.stem.startswith("_"))


def resolve_stage(name: str, root: Path) -> str:
    stages = job_stages(root)
    stage = name.replace("-", "_")  # data-prepare and data_prepare both name jobs/data_prepare.py
    if stage not in stages:
        raise ConfigError(f"unknown stage {name!r}; choose one of: {', '.join(stages)}")
    return stage


def build_entrypoint(
    stage: str, config: str | None, preset: str | None, overrides: list[str] | None, stage_args: list[str]
) -> str:
    """The shell command the job runs in its working dir."""
    args = ["python", f"jobs/{stage}.py"]
    if preset:
        args += ["--preset", preset]
    if config:
        args += ["--config", config]
    for item in overrides or []:
        args += ["--set", item]
    return shlex.join(args + stage_args)


def check_stage_args(stage_args: list[str]) -> None:
    for arg in stage_args:
        option = arg.split("=", 1)[0]
        if option in ("--config", "--preset", "--set"):
            raise ConfigError(f"put {option} before `--`: `job submit` ships the config and checks it first")
        if option == "--address":
            raise ConfigError("drop --address after `--`: a job joins the cluster it runs on")
    for option, value in zip(stage_args, stage_args[1:], strict=False):
        if option == "--out" and not value.startswith("/") and "://" not in value:
            err_console.print(
                f"[yellow]note:[/] --out {value} is relative: on the cluster it lands in the job's temporary "
                "working dir; give a path on shared storage",
                highlight=False,
            )


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}  # a job's stdout is a file: unbuffered, so followed logs arrive as printed
    if mode := os.environ.get("RAY_AUTH_MODE"):
        # The stage's own ray.init must use the auth mode this client reaches the cluster with (common.py
        # defaults it to disabled). The token itself is never copied into a job's (visible) environment.
        env["RAY_AUTH_MODE"] = mode
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env {item!r} must look like KEY=VALUE")
        env[key.strip()] = value
    return env


@contextlib.contextmanager
def staged_working_dir(root: Path, config: Path | None) -> Iterator[tuple[Path, str | None]]:
    """A temporary view of the project to upload, and the config's path inside it.

    Each top-level entry is a symlink (nothing is copied; Ray packs through the links and still applies the
    project's .gitignore/.rayignore), and the config file is a real copy under _livetalk_job/, so a config from
    anywhere travels with the job.
    """
    with tempfile.TemporaryDirectory(prefix="livetalk-job-") as tmp:
        staged = Path(tmp) / root.name
        staged.mkdir()
        for entry in sorted(root.iterdir()):
            if entry.name == JOB_INPUTS_DIR or any(fnmatch.fnmatch(entry.name, p) for p in TOP_LEVEL_EXCLUDES):
                continue
            (staged / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        relative = None
        if config is not None:
            (staged / JOB_INPUTS_DIR).mkdir()
            shutil.copyfile(config, staged / JOB_INPUTS_DIR / config.name)
            relative = f"{JOB_INPUTS_DIR}/{config.name}"
        yield staged, relative


def job_server_url(address: str | None) -> str:
    raw = (
        address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    ).strip()
    if raw.startswith("ray://"):
        raise ConfigError(
            f"{raw} is a Ray Client address; job commands use the head's dashboard, e.g. {DEFAULT_ADDRESS}"
        )
    url = raw if "://" in raw else f"http://{raw}"
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise ConfigError(f"address {raw!r} is not a URL like {DEFAULT_ADDRESS}")
    return url.rstrip("/")


def _auth_hint(url: str) -> str:
    where = "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head prints it)"
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return f"the Ray cluster at {url} refused this client's auth token: give it the cluster's token as {where}"
    return f"the Ray cluster at {url} uses token auth: export RAY_AUTH_MODE=token and the cluster's token as {where}"


def _get_json(url: str, timeout_s: float) -> Any:
    """GET url as JSON; None if the body is not JSON. HTTP errors and connection errors propagate."""
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        body = reply.read()
    try:
        return json.loads(body)
    except ValueError:
        return None


def probe_job_server(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast, naming the address, if nothing there answers like a Ray job server or auth modes disagree.
    Asks /api/authentication_mode (public on a Ray >= 2.59 dashboard), else /api/version (older, no auth)."""
    not_ray = f"{url} does not answer like a Ray job server; pass the head's dashboard address (port 8265 by default)"
    try:
        try:
            answer = _get_json(f"{url}/api/authentication_mode", timeout_s)
            key = "authentication_mode"
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            answer, key = _get_json(f"{url}/api/version", timeout_s), "ray_version"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(_auth_hint(url)) from None
        raise ConfigError(f"{not_ray} (HTTP {exc.code})") from None
    except (OSError, ValueError) as exc:  # refused, timed out, unknown host, TLS
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"cannot reach the Ray job server at {url}: {reason} (is the cluster up? pass its head's dashboard "
            f"address, e.g. --address {DEFAULT_ADDRESS}, or set RAY_ADDRESS)"
        ) from None
    if not isinstance(answer, dict) or key not in answer:
        raise ConfigError(not_ray)
    if answer.get("authentication_mode") == "token" and os.environ.get("RAY_AUTH_MODE") != "token":
        raise ConfigError(_auth_hint(url))


class Cluster:
    """Ray's JobSubmissionClient for one address, with every failure turned into one clear ConfigError."""

    def __init__(self, address: str | None) -> None:
        self.url = job_server_url(address)
        probe_job_server(self.url)  # before importing Ray, which alone takes seconds
        from ray.job_submission import JobSubmissionClient

        _quiet_ray_loggers()
        hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:  # Ray lets these variables override an explicit address; --address must win
            self.client = self._call(JobSubmissionClient, self.url)
        finally:
            os.environ.update(hidden)

    def _call(self, fn, *args, job_id: str | None = None, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            raise ConfigError(_auth_hint(self.url)) from None
        except RuntimeError as exc:
            if job_id is not None and "does not exist" in str(exc):
                raise ConfigError(f"no job {job_id} on {self.url} (`livetalk job list` shows the jobs)") from None
            raise ConfigError(f"the job server at {self.url} refused: {_last_line(exc)}") from None
        except (OSError, ValueError) as exc:  # connection lost, upload or runtime_env rejected
            raise ConfigError(f"job request to {self.url} failed: {exc}") from None

    def info(self, job_id: str):
        return self._call(self.client.get_job_info, job_id, job_id=job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self.client.get_job_logs, job_id, job_id=job_id)

    def stop(self, job_id: str) -> bool:
        return self._call(self.client.stop_job, job_id, job_id=job_id)

    def jobs(self) -> list:
        return [j for j in self._call(self.client.list_jobs) if _value(j.type) == "SUBMISSION"]

    def submit(self, **kwargs) -> str:
        return self._call(self.client.submit_job, **kwargs)

    def stream_logs(self, job_id: str) -> None:
        """Print the job's log as it grows, until the job ends (Ray closes the stream then)."""

        async def pump() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        import aiohttp

        try:
            asyncio.run(pump())
        except (TimeoutError, RuntimeError, OSError, aiohttp.ClientError) as exc:
            raise ConfigError(f"the log stream of {job_id} from {self.url} broke: {exc}") from None


def _last_line(exc: Exception) -> str:
    """The cause in a server error, whose body is often a whole traceback ending in `ValueError: ...`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().strip(".")]
    return lines[-1] if lines else str(exc)


def _quiet_ray_loggers() -> None:
    import logging

    # Ray's client logs every upload step at INFO; the spinner and the summary line say what matters.
    for name in ("dashboard.modules.dashboard_sdk", "dashboard.modules.job.sdk", "_private.runtime_env.packaging"):
        logging.getLogger(f"ray.{name}").setLevel(logging.WARNING)


def _value(field: Any) -> str:
    return str(getattr(field, "value", field))


def _job_id(info) -> str:
    return escape(info.submission_id or info.job_id or "?")


def _stage(info) -> str:
    stage = (info.metadata or {}).get("livetalk_stage")
    return escape(stage or (info.entrypoint[:40] + ("…" if len(info.entrypoint) > 40 else "")))


def _styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _took(info) -> str:
    seconds = int(((info.end_time or time.time() * 1000) - info.start_time) / 1000) if info.start_time else None
    if seconds is None:
        return "-"
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _reason(info) -> str:
    lines = (info.message or "").strip().splitlines()
    # Ray appends the log's tail to a failure's first line; the tail is printed on its own.
    return escape(lines[0].split(", last available logs")[0]) if lines else "no message"


def _wait_until(cluster: Cluster, job_id: str, done, label: str, timeout_s: float | None = None):
    """Poll the job's status (with a spinner) until done(status) or the timeout; returns the last info."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with console.status(label) as spinner:
        while True:
            info = cluster.info(job_id)
            status = _value(info.status)
            if done(status) or (deadline is not None and time.monotonic() > deadline):
                return info
            spinner.update(f"{label} ({status})")
            time.sleep(0.5)


def _report_end(cluster: Cluster, info) -> int:
    """The outcome line (and, for a failure, the log's last lines); the exit code it means."""
    job_id, status = _job_id(info), _value(info.status)
    if status in HEALTHY:  # SUCCEEDED, or still running after the log stream closed
        console.print(f"job {job_id} {_styled(status)} after {_took(info)}: {_reason(info)}", highlight=False)
        return 0
    # The log says why the entrypoint failed; for a failure before it ran (runtime env setup, an unschedulable
    # supervisor) the cause is in the message after its first line.
    ran = info.error_type in (None, "JOB_ENTRYPOINT_COMMAND_ERROR")
    lines = cluster.logs(job_id).rstrip().splitlines() if ran else (info.message or "").splitlines()[1:]
    if lines:
        err_console.rule(f"last {min(len(lines), LOG_TAIL_LINES)} lines of {job_id}'s {'log' if ran else 'message'}")
        err_console.print("\n".join(lines[-LOG_TAIL_LINES:]), markup=False, highlight=False)
        err_console.rule()
    kind = f" ({info.error_type})" if info.error_type else ""
    err_console.print(f"[bold red]job {job_id} {status}{kind}:[/] {_reason(info)}", highlight=False)
    return 1


def _follow_to_end(cluster: Cluster, job_id: str) -> int:
    try:
        _wait_until(cluster, job_id, lambda s: s != "PENDING", f"waiting for {job_id} to start")
        cluster.stream_logs(job_id)
        # The stream can close a moment before the status turns terminal.
        info = _wait_until(cluster, job_id, lambda s: s in TERMINAL, f"waiting for {job_id} to end", timeout_s=30)
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]stopped following; job {job_id} keeps running[/] (`livetalk job stop {job_id}`)", highlight=False
        )
        return 130
    return _report_end(cluster, info)


@job_app.command(
    "submit",
    epilog="Example: livetalk job submit teacher --address http://head:8265 --config my.yaml --wait "
    "-- --data /shared/shards --out /shared/runs/teacher",
)
@friendly_errors
def submit(
    stage: Annotated[str, typer.Argument(help="a jobs/<stage>.py entrypoint: data_prepare, vae, teacher, ...")],
    stage_args: Annotated[
        list[str] | None, typer.Argument(help="the stage's own options, after `--` (paths are cluster paths)")
    ] = None,
    address: JobAddressOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="job environment variable KEY=VALUE")] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="requirement Ray installs for this job (runtime_env pip)")
    ] = None,
    entrypoint_cpus: Annotated[
        float | None, typer.Option("--entrypoint-cpus", min=0, help="CPUs reserved for the entrypoint (vae fits in it)")
    ] = None,
    entrypoint_gpus: Annotated[
        float | None, typer.Option("--entrypoint-gpus", min=0, help="GPUs for the entrypoint")
    ] = None,
    job_id: Annotated[str | None, typer.Option("--job-id", help="submission id (default: Ray picks one)")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "--follow", help="stream the log until the job ends; exit 1 if it fails")
    ] = False,
) -> None:
    """Submit STAGE as a Ray job: this project as the working dir, --config shipped with it, --set passed on."""
    root = project_root()
    stage = resolve_stage(stage, root)
    stage_args = list(stage_args or [])
    check_stage_args(stage_args)
    load_config(preset, config, set_)  # a bad file or override fails here, not after a queue wait on the cluster
    env_vars = parse_env(env)
    cluster = Cluster(address)
    with staged_working_dir(root, config) as (working_dir, staged_config):
        runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": PACKING_EXCLUDES}
        runtime_env |= {"env_vars": env_vars, **({"pip": list(pip)} if pip else {})}
        metadata = {"livetalk_stage": stage, "livetalk_config": config.name if config else ""}
        with console.status(f"uploading {root} and submitting {stage} to {cluster.url}"):
            submission_id = cluster.submit(
                entrypoint=build_entrypoint(stage, staged_config, preset, set_, stage_args),
                runtime_env=runtime_env,
                metadata=metadata,
                submission_id=job_id,
                entrypoint_num_cpus=entrypoint_cpus,  # default 0: the entrypoint may land on any node, the head too
                entrypoint_num_gpus=entrypoint_gpus,
            )
    console.print(f"submitted {stage} as job [bold]{escape(submission_id)}[/] to {cluster.url}", highlight=False)
    if not wait:
        where = f" --address {cluster.url}"
        console.print(f"  follow: livetalk job logs {submission_id} --follow{where}", highlight=False)
        console.print(f"  status: livetalk job status {submission_id}{where}", highlight=False)
        console.print(f"  stop:   livetalk job stop {submission_id}{where}", highlight=False)
        return
    raise typer.Exit(_follow_to_end(cluster, submission_id))


@job_app.command("status")
@friendly_errors
def status_command(job_id: JobIdArg, address: JobAddressOpt = None) -> None:
    """Status and message of a job; exits 0 for SUCCEEDED, RUNNING or PENDING and 1 for FAILED or STOPPED."""
    info = Cluster(address).info(job_id)
    status = _value(info.status)
    kind = f" ({info.error_type})" if info.error_type else ""
    console.print(f"job {_job_id(info)} ({_stage(info)}): {_styled(status)}", highlight=False)
    console.print(f"  message:    {_reason(info)}{kind}", highlight=False)
    times = f"{_when(info.start_time)}  ended: {_when(info.end_time)}  took: {_took(info)}"
    console.print(f"  started:    {times}", highlight=False)
    console.print(f"  entrypoint: {info.entrypoint}", highlight=False, markup=False)
    if status not in HEALTHY:
        raise typer.Exit(1)


@job_app.command("logs")
@friendly_errors
def logs_command(
    job_id: JobIdArg,
    address: JobAddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="stream until the job ends; exit 1 if it FAILED or was STOPPED")
    ] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=1, help="only the last N lines")] = None,
) -> None:
    """Print a job's log (driver stdout and stderr); --follow streams it until the job ends."""
    cluster = Cluster(address)
    if follow:
        raise typer.Exit(_follow_to_end(cluster, job_id))
    text = cluster.logs(job_id)
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:])
    sys.stdout.write(text)


@job_app.command("stop")
@friendly_errors
def stop_command(
    job_id: JobIdArg,
    address: JobAddressOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds to wait for the job to end")] = 60.0,
) -> None:
    """Stop a job (SIGTERM, then SIGKILL after Ray's grace period) and wait until it has ended."""
    cluster = Cluster(address)
    info = cluster.info(job_id)
    if _value(info.status) in TERMINAL:
        console.print(f"job {job_id} already ended: {_styled(_value(info.status))}", highlight=False)
        return
    cluster.stop(job_id)
    info = _wait_until(cluster, job_id, lambda s: s in TERMINAL, f"stopping {job_id}", timeout_s=timeout)
    status = _value(info.status)
    if status not in TERMINAL:
        err_console.print(f"[bold red]error:[/] job {job_id} is still {status} after {timeout:g} s", highlight=False)
        raise typer.Exit(1)
    console.print(f"job {job_id} {_styled(status)}", highlight=False)


@job_app.command("list")
@friendly_errors
def list_command(address: JobAddressOpt = None) -> None:
    """Every submitted job on the cluster, oldest first: id, stage, status, start time, duration."""
    from rich import box
    from rich.table import Table

    cluster = Cluster(address)
    jobs = sorted(cluster.jobs(), key=lambda j: j.start_time or float("inf"))
    if not jobs:
        console.print(f"no jobs on {cluster.url}", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job id", no_wrap=True)
    table.add_column("stage", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("took", no_wrap=True, justify="right")
    for info in jobs:
        status = _value(info.status)
        table.add_row(_job_id(info), _stage(info), _styled(status), _when(info.start_time), _took(info))
    console.print(table)
